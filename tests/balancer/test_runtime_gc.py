"""A serving worker keeps its start-up objects out of the cyclic collector (``runtime.settle_gc``).

In a process of its own (``gc.freeze`` is process-wide): ``runtime.serve`` on a real listener,
a reference cycle made before start-up and dropped once serving, then a SIGHUP reload. Frozen,
the cycle survives a collection; the reload's unfreeze + collection frees it, so a reload leaks
nothing that start-up froze.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.peers import free_port

SCRIPT = r"""
import asyncio, gc, json, os, signal, sys, weakref
from l4lb.balancer import runtime
from l4lb.config.loader import load_config

class Node:
    pass

async def main(path):
    held = [Node()]
    held[0].me = held[0]  # a cycle: only the cyclic collector can free it
    ref = weakref.ref(held[0])
    serving = asyncio.create_task(runtime.serve(load_config(path), path))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while gc.get_freeze_count() == 0 and not serving.done() and loop.time() < deadline:
        await asyncio.sleep(0.01)  # serve freezes once its listeners are up
    report = {"frozen": gc.get_freeze_count()}
    held.clear()
    gc.collect()
    report["kept_while_frozen"] = ref() is not None
    os.kill(os.getpid(), signal.SIGHUP)
    while ref() is not None and not serving.done() and loop.time() < deadline:
        await asyncio.sleep(0.01)  # the reload settles the collector again
    report["freed_after_reload"] = ref() is None
    report["frozen_after_reload"] = gc.get_freeze_count()
    os.kill(os.getpid(), signal.SIGTERM)
    report["code"] = await serving
    print(json.dumps(report), flush=True)

asyncio.run(main(sys.argv[1]))
"""


def test_start_up_objects_are_frozen_and_a_reload_frees_what_it_dropped(tmp_path: Path) -> None:
    config = tmp_path / "l4lb.toml"
    config.write_text(
        'workers = 1\n[log]\naccess = "off"\n'
        f'[[listeners]]\nname = "main"\nbind = "127.0.0.1:{free_port()}"\npool = "main"\n'
        '[pools.main]\nbackends = [{ address = "127.0.0.1:9" }]\n'
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["code"] == 0, proc.stderr
    # the modules, config and listeners: thousands of objects, never scanned again
    assert report["frozen"] > 1000, report
    assert report["kept_while_frozen"] is True, report
    assert report["freed_after_reload"] is True, report
    assert report["frozen_after_reload"] > 1000, report
