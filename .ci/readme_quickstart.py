"""Runs the README's "Quick start" Python block as written, except that weights are random
(``pretrained=True`` -> ``False``: nothing can be downloaded in CI)."""

import re
import sys
import tempfile
from pathlib import Path

readme = Path(sys.argv[1]).read_text()
section = readme.split("## Quick start", 1)[1]
code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
code = code.replace("pretrained=True", "pretrained=False")
with tempfile.TemporaryDirectory() as directory:
    import os

    os.chdir(directory)
    exec(compile(code, "README.md quick start", "exec"), {"__name__": "__main__"})
print("README quick start: ran")
