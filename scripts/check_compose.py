"""Checks the resolved compose file (stdin) against the deployment's rules.

Usage: docker-compose config | python3 check_compose.py [BIN_DIR]
With BIN_DIR, each service command of ours is run with `--help` appended:
clap rejects an unknown flag before it prints help, so this proves the flags
in the file exist in the binaries.
"""

import os
import subprocess
import sys

import yaml

SCALABLE = {"embark", "kfc", "retina"}
LONG_RUNNING = {"scylla", "kafka", "embark", "kfc", "retina"}
OURS = {"embark", "kfc", "retina", "migrate"}

doc = yaml.safe_load(sys.stdin)
services = doc["services"]
errors = []

for name in sorted(SCALABLE | LONG_RUNNING | {"models", "migrate"}):
    if name not in services:
        errors.append(f"service {name!r} is missing")
for name in SCALABLE & services.keys():
    svc = services[name]
    if "container_name" in svc:
        errors.append(f"{name}: container_name stops --scale")
    for port in svc.get("ports", []):
        published = port.get("published") if isinstance(port, dict) else None
        if published not in (None, "", 0):
            errors.append(f"{name}: fixed host port {published} stops --scale")
for name in LONG_RUNNING & services.keys():
    if "healthcheck" not in services[name]:
        errors.append(f"{name}: no healthcheck")
for name in ("embark", "kfc", "retina"):
    svc = services.get(name, {})
    mounts = [
        (v.get("source"), v.get("target")) if isinstance(v, dict) else tuple(v.split(":")[:2])
        for v in svc.get("volumes", [])
    ]
    if ("models", "/models") not in mounts:
        errors.append(f"{name}: the models volume is not mounted at /models")
    if "build" not in svc:
        errors.append(f"{name}: not built from the project's Dockerfile")

bin_dir = sys.argv[1] if len(sys.argv) > 1 else ""
if bin_dir:
    for name in sorted(OURS & services.keys()):
        cmd = services[name].get("command")
        if not cmd:
            errors.append(f"{name}: no command")
            continue
        argv = [os.path.join(bin_dir, cmd[0])] + cmd[1:] + ["--help"]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if run.returncode != 0:
            errors.append(f"{name}: {' '.join(cmd)} is refused: {run.stderr.strip()[:300]}")

if errors:
    print("docker-compose.yml:", *errors, sep="\n  ", file=sys.stderr)
    sys.exit(1)
checked = "schema, scaling rules and flags" if bin_dir else "schema and scaling rules"
print(f"docker-compose.yml: {len(services)} services, {checked} ok")
