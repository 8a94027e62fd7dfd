#!/usr/bin/env python3
"""Check the `az` commands of the deployment guides against the Azure CLI's own parser.

Usage: check-az-commands.py AZ DOC.md...

Every `az ...` line of a ```sh block (with its backslash continuations) must
  * follow a comment line naming the Microsoft document it comes from (learn.microsoft.com),
  * be a command the installed azure-cli knows (`az <command> --help` succeeds), and
  * use only options that command's parser defines (each --option is in its --help).
Commands of extensions the CLI does not have (az confcom) are listed as not checked.
"""
import re
import shlex
import subprocess
import sys

EXTENSIONS = {"confcom"}


def commands(path):
    """(line number, source comment, command words) for each az command of a sh block."""
    out, in_block, comment, pending, start = [], False, None, "", 0
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if line.startswith("```"):
                in_block = line.strip() in ("```sh", "```bash")
                comment, pending = None, ""
                continue
            if not in_block:
                continue
            if pending:
                pending += " " + line.strip()
            elif line.startswith("az "):
                pending, start = line.strip(), n
            elif line.lstrip().startswith("#"):
                if "learn.microsoft.com" in line:
                    comment = line.strip()
                continue
            else:
                continue
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            out.append((start, comment, shlex.split(pending, comments=True)))
            pending = ""
    return out


def main():
    az, docs = sys.argv[1], sys.argv[2:]
    failures, checked, unchecked = [], 0, []
    help_cache = {}
    for doc in docs:
        for line, source, words in commands(doc):
            where = f"{doc}:{line}"
            path = []
            for w in words[1:]:
                if w.startswith("-"):
                    break
                path.append(w)
            options = sorted({w.split("=")[0] for w in words if re.match(r"^--[a-z]", w)})
            if not source:
                failures.append(f"{where}: az {' '.join(path)}: no preceding comment naming its learn.microsoft.com document")
            if path and path[0] in EXTENSIONS:
                unchecked.append(f"{where}: az {' '.join(path)} (extension {path[0]})")
                continue
            key = " ".join(path)
            if key not in help_cache:
                r = subprocess.run([az, *path, "--help"], capture_output=True, text=True)
                help_cache[key] = r.stdout if r.returncode == 0 else None
            text = help_cache[key]
            if text is None:
                failures.append(f"{where}: az {key}: not a command of this azure-cli")
                continue
            defined = set(re.findall(r"(--[a-z][a-z0-9-]*)", text))
            for o in options:
                if o not in defined:
                    failures.append(f"{where}: az {key}: no option {o}")
            checked += 1
    for u in unchecked:
        print(f"check-az-commands: not checked (extension not installable from PyPI): {u}")
    for f in failures:
        print(f"check-az-commands: FAIL: {f}")
    print(f"check-az-commands: {checked} commands parsed, {len(unchecked)} not checked, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
