"""A process that has imported torch, transformers and sftlab once and forks a child per command: the crash tests
run many short CLI processes and kill them with SIGKILL (sftlab/faults.py), which would cost ~6 s of imports
each on 2 cores. The child runs `sftlab.cli.main(argv)` exactly as the console script does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from sftlab.faults import FAULT_ENV

ZYGOTE = r"""
import json, os, sys, traceback
import torch, transformers, peft  # the slow imports, paid once
import sftlab.cli, sftlab.train.loop
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "run":
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout.reconfigure(line_buffering=True)
                os.environ.update(req["env"])
                if "code" in req:  # for what has no subcommand of its own; ARGV holds the arguments
                    exec(req["code"], {"ARGV": req["argv"]})
                    rc = 0
                else:
                    rc = sftlab.cli.main(req["argv"])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        print(json.dumps({"pid": pid}), flush=True)
    elif req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                          "rc": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
"""


class Zygote:
    def __init__(self, cache: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "SFTLAB_CACHE": str(cache)}
        env.pop(FAULT_ENV, None)
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the zygote process died"
        return json.loads(line)

    def run(self, argv: list, log: Path, fault: str | None = None, code: str | None = None,
            env: dict | None = None) -> dict:
        """Run `sftlab argv` (or `code`) in a forked child to its end; {'signal': ..., 'rc': ..., 'log': text}."""
        req = {"op": "run", "argv": argv, "log": str(log), "env": {**(env or {}), **({FAULT_ENV: fault} if fault else {})}}
        if code:
            req["code"] = code
        pid = self._ask(req)["pid"]
        status = self._ask({"op": "wait", "pid": pid})
        return {**status, "log": log.read_text()}

    def killed_at(self, argv: list, log: Path, point: str, step: int | None, **kw) -> str:
        """Run with the fault set; assert that it died by SIGKILL at exactly that point. Returns the log."""
        spec = point if step is None else f"{point}@{step}"
        got = self.run(argv, log, spec, **kw)
        assert got["signal"] == signal.SIGKILL, f"{spec}: not killed ({got['rc']=}); log:\n{got['log']}"
        where = f"SIGKILL at {point}" + (f" at step {step}" if step is not None else "")
        assert f"sftlab-fault: {where}" in got["log"], got["log"]
        return got["log"]

    def ok(self, argv: list, log: Path, **kw) -> str:
        got = self.run(argv, log, None, **kw)
        assert got["rc"] == 0 and got["signal"] is None, got["log"]
        return got["log"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
