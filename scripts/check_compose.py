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
OURS = {"embark", "kfc", "retina", "migrate", "certs"}
# Who may publish a port on the host, and which: EmbArk's gRPC port only.
PUBLISHED = {"embark": "50051"}
LOOPBACK = {"127.0.0.1", "::1"}
# The gRPC servers: TLS and tokens; Retina also wants client certificates.
TLS_FLAGS = {
    "embark": ["--tls-cert", "--tls-key", "--auth-tokens"],
    "retina": ["--tls-cert", "--tls-key", "--tls-client-ca", "--auth-tokens"],
    "kfc": ["--retina-ca", "--retina-cert", "--retina-key"],
}


def port_parts(port):
    """(host ip, host port, container port) of a ports entry, in the long
    form (docker compose v2's `config`) or the short one (v1's, and files)."""
    if isinstance(port, dict):
        return str(port.get("host_ip") or ""), str(port.get("published") or ""), str(port.get("target", ""))
    text = str(port).split("/")[0]
    if text.startswith("["):  # [v6]:host:container
        ip, _, rest = text[1:].partition("]")
        host, _, target = rest.lstrip(":").rpartition(":")
        return ip, host, target
    parts = text.split(":")
    if len(parts) == 1:
        return "", "", parts[0]
    if len(parts) == 2:
        return "", parts[0], parts[1]
    return ":".join(parts[:-2]), parts[-2], parts[-1]


def flag_values(cmd, flag):
    """The values `cmd` gives `flag` (as --flag=value or --flag value)."""
    out = []
    for i, arg in enumerate(cmd or []):
        if arg.startswith(flag + "="):
            out.append(arg[len(flag) + 1 :])
        elif arg == flag and i + 1 < len(cmd):
            out.append(cmd[i + 1])
    return out


doc = yaml.safe_load(sys.stdin)
services = doc["services"]
errors = []

for name in sorted(SCALABLE | LONG_RUNNING | {"models", "migrate", "certs"}):
    if name not in services:
        errors.append(f"service {name!r} is missing")
for name in SCALABLE & services.keys():
    svc = services[name]
    if "container_name" in svc:
        errors.append(f"{name}: container_name stops --scale")
    for port in svc.get("ports", []):
        _, published, _ = port_parts(port)
        if published not in ("", "0"):
            errors.append(f"{name}: fixed host port {published} stops --scale")
for name, svc in sorted(services.items()):
    for port in svc.get("ports", []):
        ip, _, target = port_parts(port)
        if PUBLISHED.get(name) != target:
            errors.append(f"{name}: publishes port {target}; only embark's gRPC port may be published")
        if ip not in LOOPBACK:
            errors.append(f"{name}: port {target} is published on {ip or 'every interface'}, not 127.0.0.1")
for name, flags in sorted(TLS_FLAGS.items()):
    cmd = services.get(name, {}).get("command") or []
    for flag in flags:
        if not flag_values(cmd, flag):
            errors.append(f"{name}: no {flag}")
for url in flag_values(services.get("kfc", {}).get("command"), "--retina"):
    if not url.startswith("https://"):
        errors.append(f"kfc: --retina={url} is not TLS (https://)")
for name, svc in sorted(services.items()):
    mounts_certs = any(
        (v.get("source") if isinstance(v, dict) else v.split(":")[0]) == "certs" for v in svc.get("volumes", [])
    )
    if mounts_certs and name != "certs":
        cond = (svc.get("depends_on") or {}).get("certs") if isinstance(svc.get("depends_on"), dict) else None
        if not cond or cond.get("condition") != "service_completed_successfully":
            errors.append(f"{name}: mounts the certs volume but does not wait for `certs` to complete")
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
checked = "schema, scaling and exposure rules, and flags" if bin_dir else "schema, scaling and exposure rules"
print(f"docker-compose.yml: {len(services)} services, {checked} ok")
