"""Run `llama-export` as a user would, many times, without paying the import of torch every time.

`CliProcesses` starts one server process that imports `llama_export.cli` (and torch) and then, per
request, forks a child that runs `main(argv)` exactly as `python -m llama_export.cli ARGV` does: its
own process (own pid, signal handlers, exit status), stdout/stderr captured at the file-descriptor
level, stdin from /dev/null. The server never runs model code itself, so every child starts from the
same freshly imported state (no thread pools to inherit across the fork). Rank processes of TP>1 runs
are started by the child with `python -m llama_export.cli`, as always.

With LLAMA_EXPORT_CLI_SUBPROCESS=1 every request runs `python -m llama_export.cli` from scratch instead
(slow; to check that both give the same results).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO

_SERVER = r"""
import json, os, resource, sys
import llama_export.cli as cli
import torch  # noqa: F401  (imported once here, shared by every child)

for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.chdir(req["cwd"])
            os.environ.update(req["env"])
            if req.get("fsize") is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
            sys.argv = ["llama-export", *req["argv"]]
            code = cli.main(req["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class CliProcesses:
    def __init__(self) -> None:
        self.subprocess_mode = os.environ.get("LLAMA_EXPORT_CLI_SUBPROCESS") == "1"
        self.server = None
        self.tmp = Path(tempfile.mkdtemp(prefix="llama_export-cli-"))
        if not self.subprocess_mode:
            self.server = subprocess.Popen(
                [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            )

    def run(self, *argv: str, cwd: Path = REPO, env: dict | None = None, fsize: int | None = None,
            timeout: float = 300) -> Result:
        out, err = self.tmp / "stdout", self.tmp / "stderr"
        if self.subprocess_mode:
            preexec = None
            if fsize is not None:
                import resource

                def preexec():
                    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            r = subprocess.run([sys.executable, "-m", "llama_export.cli", *argv], capture_output=True, text=True,
                               cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                               timeout=timeout, preexec_fn=preexec)
            return Result(r.returncode, r.stdout, r.stderr)
        req = {"argv": list(argv), "cwd": str(cwd), "env": env or {}, "fsize": fsize,
               "stdout": str(out), "stderr": str(err)}
        self.server.stdin.write(json.dumps(req) + "\n")
        self.server.stdin.flush()
        reply = self.server.stdout.readline()
        if not reply:
            raise RuntimeError("the CLI server died")
        code = json.loads(reply)["code"]
        return Result(code, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=30)
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)
