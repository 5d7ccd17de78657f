"""What a task printed, as the slot subprocess's capture finds it: Python prints, writes to
fd 1 and 2 (as C libraries make), nothing at all, and the tasks after the output file was
emptied past its rotation size. In a fresh interpreter: the capture takes over fds 1/2."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from coffea_hq.worker.capture import TaskCapture, _Output

    out = open(sys.argv[1], "w")
    sys.stdout = sys.stderr  # as in the slot subprocess
    capture = TaskCapture(os.dup(2))
    tasks = [
        lambda: print("hello"),
        lambda: None,
        lambda: os.write(1, b"from fd 1\\n"),
        lambda: (os.write(2, b"a"), print("b", end="")),
        lambda: os.write(1, b"x" * (_Output._ROTATE + 10)),  # past the rotation size
        lambda: None,
        lambda: print("after"),
        lambda: None,
        lambda: print("again"),
    ]
    seen = []
    for task in tasks:
        with capture:
            task()
        o = capture.info.output
        seen.append(o if len(o) < 100 else f"{len(o)} chars ending {o[-5:]!r}")
    capture.close()
    out.write(json.dumps(seen))
    """
)


def test_each_task_gets_what_it_printed(tmp_path: Path) -> None:
    result = tmp_path / "seen.json"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(result)], capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    seen = json.loads(result.read_text())
    assert seen[:4] == ["hello\n", "", "from fd 1\n", "ab"]
    assert seen[4].endswith("ending 'xxxxx'")
    assert seen[5:] == ["", "after\n", "", "again\n"]
    # Everything was passed on to the real stderr as well (the worker's log).
    assert proc.stderr.count(b"x") >= (1 << 20) and b"after\nagain\n" in proc.stderr
