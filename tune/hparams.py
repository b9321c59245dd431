"""TensorBoard's HParams view of a sweep: one session per trial, in the trial's own TensorBoard run
(<trial>/run/tb, where the round loop writes its scalars), so `tensorboard --logdir <storage>/<name>`
shows one stream per trial and the HParams tab compares the trials by parameter.

Each trial's run gets one event file, HPARAMS_FILE, written by the sweep once its trials are done
(and written again, whole, when a resumed sweep ends): the experiment (every searched key with its
domain, and the metrics below), the session start (the trial's values), the metrics and the session
end (success, or failure for a trial that failed). The metrics are scalars under these tags:

    best/valid/<m>    the validation metric at the round `pipeline train` selects (tune/trials.py)
    best/test/<m>     the test metric at that round
    best/round        that round
    sweep/rounds_run  the rounds the trial ran (fewer: stopped by its patience, by ASHA, or failed)

written at the selected round's step. Built with TensorBoard's own hparams summary API
(tensorboard.plugins.hparams.summary_v2) and record writer; no TensorFlow needed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

HPARAMS_FILE = "events.out.tfevents.sweep-hparams"  # sorts after the round loop's files (digits first)


def _domain(spec: dict):
    from tensorboard.plugins.hparams import summary_v2 as hp

    name, args = next(iter(spec.items()))
    if name in ("uniform", "loguniform"):
        return hp.RealInterval(float(args[0]), float(args[1]))
    if name == "randint":
        return hp.IntInterval(int(args[0]), int(args[1]) - 1)  # randint excludes high
    values = [_value(v) for v in args]
    kinds = {type(v) for v in values}
    if kinds <= {int, float} and len(kinds) == 2:
        values = [float(v) for v in values]
    try:
        return hp.Discrete(values)
    except ValueError:  # mixed kinds: the values are listed in the table, not as a domain
        return None


def _value(value):
    """An HParams value: a bool, number or string (a list or mapping as its JSON text)."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


def metric_tags(metric: str) -> list[str]:
    """The HParams metrics of a sweep selecting on `metric` (e.g. 'valid/hr@10')."""
    name = metric.removeprefix("valid/")
    return [f"best/valid/{name}", f"best/test/{name}", "best/round", "sweep/rounds_run"]


def write_hparams(rows: list[dict], params: dict[str, dict], metric: str) -> list[Path]:
    """Write HPARAMS_FILE into the TensorBoard folder of every trial of `rows` (tune.trials.trial_rows)
    that has one (runtime.tensorboard: false writes none); returns the files written."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp
    from tensorboard.summary.writer.record_writer import RecordWriter

    hparams = [hp.HParam(key, _domain(spec)) for key, spec in params.items()]
    tags = metric_tags(metric)
    experiment = hp.hparams_config_pb(hparams, [hp.Metric(tag) for tag in tags])
    written = []
    for row in rows:
        tb = Path(row["path"]) / "run" / "tb"
        if not tb.is_dir():
            continue
        now = time.time()
        values = {key: _value(row["params"][key]) for key in params if key in row["params"]}
        start = hp.hparams_pb(values, trial_id=row["trial"], start_time_secs=now)
        status = api_pb2.STATUS_FAILURE if row["status"] == "ERROR" else \
            api_pb2.STATUS_UNKNOWN if row["status"] == "unfinished" else api_pb2.STATUS_SUCCESS
        end = summary_pb2.Summary()
        end.value.add(tag=metadata.SESSION_END_INFO_TAG, tensor=metadata.NULL_TENSOR,
                      metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(
                          session_end_info=plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=now))))
        step = row["best_round"] or 0
        scalars = summary_pb2.Summary()
        for tag, value in zip(tags, (row["valid"], row["test"], row["best_round"], row["rounds"])):
            if value is not None:
                scalars.value.add(tag=tag, simple_value=float(value))
        tmp = tb / ".sweep-hparams.tmp"  # no 'tfevents' in a half-written file's name: TensorBoard skips it
        with open(tmp, "wb") as file:
            records = RecordWriter(file)
            records.write(event_pb2.Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
            for summary in (experiment, start, scalars, end):
                records.write(event_pb2.Event(wall_time=now, step=step, summary=summary).SerializeToString())
        os.replace(tmp, tb / HPARAMS_FILE)
        written.append(tb / HPARAMS_FILE)
    return written
