#!/usr/bin/env bash
# Regenerate the committed Python modules of gateways/proto/*.proto (cosy grpc's messages and stubs):
#   scripts/gen-grpc.sh          (uses .venv, or $PYTHON)
# Generated with grpcio-tools==1.85.1 (protobuf gencode 7.35.1): the modules then need grpcio>=1.85.1 and protobuf>=7.35.1 at
# run time, the lower bounds of pyproject.toml's `grpc` extra. Change those together with the version used here.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
WANT=1.85.1
have="$("$PY" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))' 2>/dev/null || true)"
if [[ "$have" != "$WANT" ]]; then
  echo "gen-grpc: needs grpcio-tools==$WANT in $PY (found ${have:-none}): $PY -m pip install grpcio-tools==$WANT" >&2
  exit 2
fi
# protoc names the imports after the path below -I: lay the files out as the installed package
# (cosy/gateways/proto/), so the stubs import `from cosy.gateways.proto import ...`.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/cosy/gateways/proto"
cp "$ROOT"/gateways/proto/*.proto "$tmp/cosy/gateways/proto/"
"$PY" -m grpc_tools.protoc -I "$tmp" --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  "$tmp"/cosy/gateways/proto/*.proto
for f in "$tmp"/cosy/gateways/proto/*_pb2*.py*; do
  cp "$f" "$ROOT/gateways/proto/"
done
echo "gen-grpc: wrote $(cd "$tmp/cosy/gateways/proto" && ls ./*_pb2*.py* | tr '\n' ' ')"
