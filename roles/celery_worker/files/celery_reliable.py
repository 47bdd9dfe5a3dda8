# Managed by Ansible (celery_worker role): do not edit, changes are overwritten.
"""Run the user's Celery application with the bundle's reliable settings.

The worker units start ``celery --app=celery_reliable worker``. This module finds the
application named by ``CELERY_WORKER_USER_APP`` exactly as ``celery -A`` would, then
applies the settings in ``CELERY_WORKER_SETTINGS_FILE`` (JSON) over whatever the
application configured itself, so late acknowledgement and the derived timeouts hold
whatever the application module sets, without editing it. The broker URL comes from
``CELERY_BROKER_URL``, which Celery prefers over any configured ``broker_url``.
"""

import json
import os

from celery import signals
from celery.app.utils import find_app
from kombu.transport import TRANSPORT_ALIASES

import celery_reliable_amqp
import celery_reliable_fence
import celery_reliable_watchdog

# Pool processes stop their task once the broker may have handed it to another worker
# (celery_reliable_fence.py; imported here, before the pool forks).
celery_reliable_fence.connect(signals)

# Redis: use the transport that pops and records each message in one atomic step, and
# returns a crashed predecessor's tasks at once unless CELERY_WORKER_FAST_RECOVERY is "0"
# (celery_reliable_redis.py beside this file).
TRANSPORT_ALIASES["redis"] = TRANSPORT_ALIASES["rediss"] = "celery_reliable_redis:Transport"

app = find_app(os.environ["CELERY_WORKER_USER_APP"])

# RabbitMQ: echo through the broker every second and stop the running tasks before the
# broker can requeue them for another worker (celery_reliable_amqp.py; idle on Redis).
app.steps["consumer"].add(celery_reliable_amqp.Echo)

# systemd: READY=1 once the worker consumes, WATCHDOG=1 only while it consumes
# (celery_reliable_watchdog.py): a worker that stops consuming is restarted.
app.steps["consumer"].add(celery_reliable_watchdog.Watchdog)

with open(os.environ["CELERY_WORKER_SETTINGS_FILE"], encoding="utf-8") as settings_file:
    app.conf.update(json.load(settings_file))
