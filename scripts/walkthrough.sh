#!/usr/bin/env bash
# Runs inside a laptop namespace (`tpnb devcluster laptop -- bash scripts/walkthrough.sh`).
# Each step prints the command first, like the seed's console transcript.
set -euo pipefail
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "$@"; "$@"; }

# like the seed, start from no session and no hello (an earlier run's is removed quietly)
tpnb quit --daemon >/dev/null 2>&1 || true
kubectl delete deploy,svc hello --ignore-not-found --wait=true >/dev/null 2>&1 || true
run kubectl create deploy hello --image=tpnb.local/echoserver:1.4
run kubectl expose deploy hello --port 80 --target-port 8080
run kubectl rollout status deploy/hello --timeout=120s
run kubectl get ns,svc,deploy,po

say "curl -sS --max-time 5 hello.default    # before connecting: the laptop cannot reach the cluster"
curl -sS --max-time 5 hello.default || true

run tpnb version
run tpnb connect
run curl -sS hello.default

say "tpnb intercept hello --port 9000 -- python3 -m http.server 9000 &"
workdir=$(mktemp -d); echo "file1" > "$workdir/file1.txt"; echo "file2" > "$workdir/file2.txt"
# job control: the intercept runs in its own process group, as in a terminal,
# so the "<ctrl>-C" below reaches it (a script's background jobs ignore SIGINT otherwise)
set -m
( cd "$workdir" && exec tpnb intercept hello --port 9000 -- python3 -m http.server 9000 ) &
icpid=$!
set +m
# ready once the intercept is ACTIVE and the command it started is serving
for _ in $(seq 1 360); do
  if tpnb status 2>/dev/null | grep -q 'hello: .*ACTIVE' && (echo > /dev/tcp/127.0.0.1/9000) 2>/dev/null; then
    break
  fi
  sleep 0.5
done
run curl -sS hello
run curl -sS hello.default

say "kill -INT %1    # <ctrl>-C ends the intercepted server and the intercept"
kill -INT -- "-$icpid"; wait "$icpid" || true
run curl -sS hello.default
say "curl -sS --max-time 5 hello    # the connected namespace stays mapped: short names still resolve"
curl -sS --max-time 5 hello | head -3 || true

run kubectl get svc,deploy,pod
run kubectl -n tpnb get svc,deploy,pod
run tpnb quit --daemon
say "curl -sS --max-time 5 hello.default"
curl -sS --max-time 5 hello.default || true
