"""Submit the weightsync demo to a running Ray cluster as a Ray job, and wait for it.

    ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1   # or your cluster
    python examples/ray_job/submit.py --address http://127.0.0.1:8265 --steps 3

The job's driver runs ``python -m weightsync.cli demo --ray-address auto`` on the head node:
it joins the cluster, places the two trainer actors there and starts its engine. Exits 0 only
if the job SUCCEEDED (the demo itself exits non-zero when a sync or its checks failed).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default="http://127.0.0.1:8265", help="job server URL")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter on the cluster nodes that has weightsync installed",
    )
    parser.add_argument("--steps", type=int, default=3)
    # One per user, made private by the demo (it refuses one someone else created first).
    parser.add_argument("--out", default=f"/tmp/weightsync-ray-job-{os.getuid()}")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument(
        "demo_args", nargs=argparse.REMAINDER, help="extra `weightsync demo` arguments after --"
    )
    args = parser.parse_args()

    from ray.job_submission import JobStatus, JobSubmissionClient

    extra = [a for a in args.demo_args if a != "--"]
    entrypoint = shlex.join(
        [
            args.python,
            "-m",
            "weightsync.cli",
            "demo",
            "--ray-address",
            "auto",
            "--steps",
            str(args.steps),
            "--out",
            args.out,
            *extra,
        ]
    )
    client = JobSubmissionClient(args.address)
    job_id = client.submit_job(entrypoint=entrypoint)
    print(f"submitted {job_id}: {entrypoint}", flush=True)
    deadline = time.monotonic() + args.timeout_s
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(job_id)) not in terminal:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            print(f"{job_id}: not finished within {args.timeout_s:.0f} s, stopped")
            return 1
        time.sleep(2)
    print(client.get_job_logs(job_id)[-6000:])
    print(f"{job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
