"""Transports: move a bucket plan's bytes from the trainer to engines.

``base`` (Sender/Receiver protocols, tickets, deadlines), ``broadcast`` (NCCL / gloo group
built like SGLang's), ``ipc`` (SGLang tensor payloads, CUDA IPC), ``shm`` (the CPU
shared-memory ring), ``disk`` (versioned safetensors directories, not driven by WeightSync).
Import the submodule you need.
"""
