"""``l4lb reload --config FILE [--pid PID | --pidfile FILE]``: a reload that tells the truth.

``kill -HUP`` succeeds whether the running balancer applies the new file or refuses it, so
``systemctl reload`` used to report success for a refused config. This command:

1. validates FILE first (as ``l4lb check``): an invalid file is reported and nothing is sent;
2. asks the running balancer to reload, through ``POST /reload`` on the admin API when the file
   has an ``[admin]`` table and no pid is given (the answer carries the outcome), else with
   SIGHUP to the pid (``--pid``, ``--pidfile``, or systemd's ``$MAINPID`` in ``ExecReload``);
3. after a signal, waits for the outcome the balancer writes to ``reload-status.json`` in its
   runtime directory (``$L4LB_RUNTIME_DIR`` or systemd's ``$RUNTIME_DIRECTORY``);
4. prints ``event=reloaded`` or ``event=reload_rejected`` (with the errors) and exits 0 or 1.

Exit codes: 0 applied (or signalled with no runtime directory to confirm it: said so), 1
refused, invalid or no answer within ``--timeout``, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from l4lb.balancer import reload_status
from l4lb.config.loader import ConfigError, load_config
from l4lb.config.schema import AdminConfig

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _pid(args: argparse.Namespace) -> int | None:
    if args.pid is not None:
        return int(args.pid)
    if args.pidfile is not None:
        text = Path(args.pidfile).read_text().strip()
        if not text.isdigit():
            raise ValueError(f"{args.pidfile}: expected a process id, found {text[:40]!r}")
        return int(text)
    main_pid = os.environ.get("MAINPID", "")
    return int(main_pid) if main_pid.isdigit() else None


def _via_admin(admin: AdminConfig, timeout: float) -> int:
    host, _, port = admin.bind.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1" if ":" not in host else "::1"
    name = f"[{host}]" if ":" in host else host
    request = urllib.request.Request(f"http://{name}:{port}/reload", data=b"", method="POST")
    if admin.token:
        request.add_header("Authorization", f"Bearer {admin.token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            doc = json.loads(resp.read())
            print(f"event=reloaded via=admin_api summary={doc.get('summary', '')!r}")
            return EXIT_OK
    except urllib.error.HTTPError as err:
        body = err.read()
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {"error": body[:200].decode(errors="replace")}
        errors = doc.get("errors") or [doc.get("error", f"HTTP {err.code}")]
        for error in errors:
            print(f"event=reload_rejected via=admin_api error={error!r}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        print(
            f"l4lb reload: the admin API at {admin.bind} did not answer ({reason}); "
            "is l4lb running? (or give --pid)",
            file=sys.stderr,
        )
        return EXIT_FAILED


def _via_signal(pid: int, timeout: float) -> int:
    folder = reload_status.directory()
    sent = time.time()
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"l4lb reload: no process {pid} (is l4lb running?)", file=sys.stderr)
        return EXIT_FAILED
    except PermissionError:
        print(f"l4lb reload: not allowed to signal process {pid}", file=sys.stderr)
        return EXIT_FAILED
    if folder is None:
        print(
            f"event=reload_signalled pid={pid} detail='outcome not confirmed: no runtime "
            "directory (set L4LB_RUNTIME_DIR, or RuntimeDirectory= in the unit) to read it from'",
            file=sys.stderr,
        )
        return EXIT_OK
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = reload_status.read(folder)
        if status is not None and status.pid == pid and status.time >= sent:
            if status.applied:
                print(f"event=reloaded pid={pid} {status.summary}".rstrip())
                return EXIT_OK
            for error in status.errors or ("refused",):
                print(f"event=reload_rejected pid={pid} error={error!r}", file=sys.stderr)
            return EXIT_FAILED
        time.sleep(0.05)
    print(
        f"l4lb reload: process {pid} gave no outcome within {timeout:g}s "
        f"(looked for {folder / reload_status.FILE})",
        file=sys.stderr,
    )
    return EXIT_FAILED


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="l4lb reload",
        description="Validate FILE, make the running l4lb reload it, and report the outcome.",
    )
    parser.add_argument("--config", "-c", required=True, metavar="FILE", help="the TOML file")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--pid", type=int, help="the l4lb process to signal (SIGHUP)")
    where.add_argument("--pidfile", metavar="FILE", help="a file holding that process id")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the outcome (30)"
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    try:
        config = load_config(args.config, check_files=True)
    except ConfigError as err:
        print(err, file=sys.stderr)
        print(
            "event=reload_rejected detail='the file is invalid: nothing was sent'", file=sys.stderr
        )
        return EXIT_FAILED
    try:
        pid = _pid(args)
    except (OSError, ValueError) as err:
        print(f"l4lb reload: {err}", file=sys.stderr)
        return EXIT_FAILED
    if pid is None and config.admin is not None:
        return _via_admin(config.admin, args.timeout)
    if pid is None:
        print(
            "l4lb reload: which process? give --pid or --pidfile (or an [admin] table to "
            "reload through the admin API)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return _via_signal(pid, args.timeout)
