"""CLI for the local Kubernetes sandbox.

    python -m e2e.cluster up --dir D     # start etcd + kube-apiserver (+ controller-manager)
    python -m e2e.cluster env --dir D    # prints: export KUBECONFIG=D/kubeconfig
    python -m e2e.cluster down --dir D   # stop every process `up` started (by pid)

The binaries come from e2e/cluster/build.sh.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from e2e.cluster.sandbox import STATE_FILE, Sandbox, SandboxError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a sandbox in --dir and leave it running")
    up.add_argument(
        "--no-controller-manager", action="store_true", help="only etcd + kube-apiserver"
    )
    up.add_argument("--timeout", type=float, default=90.0)
    for p in (
        up,
        sub.add_parser("down", help="stop the sandbox in --dir"),
        sub.add_parser("env", help="print shell exports for the sandbox in --dir"),
    ):
        p.add_argument("--dir", required=True, type=Path, help="work directory of the sandbox")
    args = parser.parse_args(argv)
    workdir: Path = args.dir.resolve()

    try:
        if args.cmd == "up":
            if (workdir / STATE_FILE).exists():
                print(f"a sandbox already runs in {workdir} (run `down` first)", file=sys.stderr)
                return 1
            sb = Sandbox.start(
                workdir,
                controller_manager=not args.no_controller_manager,
                timeout=args.timeout,
                die_with_parent=False,
            )
            sb.detach()
            print(
                f"sandbox ready at {sb.server} in {sb.startup_seconds:.1f} s "
                f"(pids {' '.join(map(str, sb.pids))}, logs in {workdir / 'logs'})",
                file=sys.stderr,
            )
            print(f"export KUBECONFIG={shlex.quote(str(sb.kubeconfig))}")
        elif args.cmd == "env":
            sb = Sandbox.attach(workdir)
            print(f"export KUBECONFIG={shlex.quote(str(sb.kubeconfig))}")
            print(f'export PATH={shlex.quote(str(sb.bin_dir))}:"$PATH"')
        elif args.cmd == "down":
            if not (workdir / STATE_FILE).exists():
                print(f"no sandbox running in {workdir}", file=sys.stderr)
                return 0
            Sandbox.attach(workdir).stop()
            print(f"sandbox in {workdir} stopped", file=sys.stderr)
    except SandboxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
