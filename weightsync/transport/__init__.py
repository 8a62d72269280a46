"""Transports: move a bucket plan's bytes from the trainer to engines.

``base`` (Sender/Receiver protocols, tickets, control messages), ``broadcast`` (NCCL / gloo
group built like SGLang's), ``ipc`` (SGLang CUDA-IPC payloads; the CPU shared-memory ring of
``shm``), ``disk`` (versioned safetensors directories). Import the submodule you need.
"""
