#!/bin/sh
# Run on a worker host of a Redis deployment with the demo app: stop the workers, queue
# COUNT no-op tasks on QUEUE, start the instance, and print how long it takes to drain
# them (queue empty and no more unacknowledged messages than before), in tasks per second.
# Usage: drain_noop.sh COUNT QUEUE INSTANCE
set -eu
count=$1 queue=$2 instance=$3
set -a; . /etc/celery/worker.env; set +a
export PYTHONPATH=/usr/local/lib/celery-worker:/opt/celery/app
cd /opt/celery/app
systemctl stop "celery-worker@$instance"
before=$(/opt/celery/venv/bin/python -c 'import os, redis; print(redis.Redis.from_url(os.environ["CELERY_BROKER_URL"]).hlen("unacked"))')
/opt/celery/venv/bin/python -m demo_app send-noop "$count" "$queue"
start=$(date +%s.%N)
systemctl start "celery-worker@$instance"
/opt/celery/venv/bin/python - "$queue" "$start" "$count" "$before" <<'PY'
import os, sys, time
import redis
queue, start, count, before = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
r = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
while r.llen(queue) or r.hlen("unacked") > before:
    time.sleep(0.05)
took = time.time() - start
print(f"{count} tasks in {took:.2f} s: {count / took:.0f} tasks/s")
PY
