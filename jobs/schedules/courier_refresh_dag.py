"""Airflow DAG `courier_feature_refresh`: the daily feature refresh (docs/schedule.md), as code.

Runs in Airflow's own environment (scripts/install_airflow.sh, Airflow 3): this file imports only
Airflow and the standard library. Every project step is a BashOperator running a project job in the
project's virtualenv; the branch decides from the refresh job's one-line JSON status (its last line of
output, pushed as XCom), never by importing the project into the scheduler.

    build_samples >> refresh_features >> recluster_due -> done
                                                      \\-> embed_items >> build_clusters >> attach_features
                                                          >> train_ctr >> review_model

Deployment settings (Airflow Variables, or AIRFLOW_VAR_<NAME> environment variables):
  courier_home  the project checkout holding .venv (required)
  courier_conf  the config YAML the jobs run with (default: <courier_home>/conf/local.yaml)
Parse-time settings (environment of the scheduler / dag processor):
  COURIER_DAG_START        first logical date (default 2026-11-20)
  COURIER_RETRY_DELAY_S    seconds between task retries (default 600)
Each run D (logical date, `ds`) covers the day D: it runs at D+1 02:30 UTC, after the day's log landed.
"""
from __future__ import annotations

import datetime as dt
import json
import os

from airflow.providers.standard.operators.bash import BashOperator
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, task
from airflow.timetables.interval import CronDataIntervalTimetable

DAG_ID = "courier_feature_refresh"
HOME = "{{ var.value.courier_home }}"
CONF = "{{ var.value.get('courier_conf', var.value.courier_home ~ '/conf/local.yaml') }}"
DAY = "{{ ds }}"
BUILD_KEY = "'{{ run_id }}'"  # build_clusters' key: a retry or a cleared run finds the clustering it built
START = os.environ.get("COURIER_DAG_START", "2026-11-20")


def job(task_id: str, script: str, args: str = "", status: bool = False, **kwargs) -> BashOperator:
    """One project job in the project's virtualenv. With status=True the job writes its one-line JSON
    status to a file whose content becomes the task's last output line (its XCom) and the task log."""
    cmd = f"cd {HOME} && .venv/bin/python jobs/{script} --conf {CONF} {args}"
    if status:
        cmd = (f'STATUS="$(mktemp)" && trap \'rm -f "$STATUS"\' EXIT && {cmd} --status-file "$STATUS"'
               f' && tail -n 1 "$STATUS"')
    return BashOperator(task_id=task_id, bash_command=cmd, **kwargs)


with DAG(
    dag_id=DAG_ID,
    # the day D runs at D+1 02:30 UTC with ds = D (the interval [D 02:30, D+1 02:30))
    schedule=CronDataIntervalTimetable("30 2 * * *", timezone="UTC"),
    start_date=dt.datetime.fromisoformat(START).replace(hour=2, minute=30, tzinfo=dt.timezone.utc),
    catchup=True,        # a backfill runs the missed days one by one, in order
    max_active_runs=1,   # day D+1's stage 1 reads day D's published tables
    default_args={"retries": 2, "retry_delay": dt.timedelta(seconds=int(os.environ.get("COURIER_RETRY_DELAY_S", "600")))},
    tags=["courier"],
    doc_md=__doc__,
) as dag:
    build_samples = job("build_samples", "build_samples.py", f"--date {DAY}")
    # The build key is the run's: a run cleared after its re-cluster is told so by the refresh's status.
    refresh = job("refresh_features", "refresh_features.py", f"--date {DAY} --build-key {BUILD_KEY}", status=True)

    @task.branch(task_id="recluster_due")
    def recluster_due(ti=None, dag_run=None) -> str:
        """Re-cluster when the refresh says drift is above features.drift_threshold, or when asked by
        hand (trigger with conf {"recluster": true}); and again when this run built a clustering already
        (cleared and run again after a later task failed: the drift it measures now is against the
        clusters it built, and its re-attach, CTR training and review must still run)."""
        if (dag_run.conf or {}).get("recluster"):
            return "embed_items"
        status = json.loads(ti.xcom_pull(task_ids="refresh_features"))
        return "embed_items" if status.get("recluster_due") or status.get("recluster_built") else "done"

    done = EmptyOperator(task_id="done")
    embed = job("embed_items", "embed_items.py")
    # No --skip-if-current here: with the same encoder and k-means settings that flag would keep the old
    # clustering, but this branch runs because the items changed (drift) or a person asked for it. The
    # build key makes a retry of a build that moved @current and then failed a no-op, not a second build.
    cluster = job("build_clusters", "build_clusters.py", f"--build-key {BUILD_KEY}")
    # Every ctr_log date up to D whose ctr_train is of another feature version, also those before the
    # DAG's start date, and later dates already attached: what the refresh job re-attaches once the new
    # clusters hold @current.
    reattach = job("attach_features", "refresh_features.py", f"--date {DAY}")
    train_ctr = job("train_ctr", "train_ctr.py", "--skip-if-done", status=True)
    # The gate: the CTR model on the new features is a challenger like any other; the review's
    # decision (promoted / rejected / refused) is the task's output, @champion moves only on promoted.
    # It reviews the version train_ctr trained (or found done), not whichever version is newest.
    trained = "{{ macros.json.loads(ti.xcom_pull(task_ids='train_ctr'))['model_version'] }}"
    review = job("review_model", "review_model.py", f"--no-tsne --version {trained}", status=True, retries=0)

    build_samples >> refresh >> recluster_due() >> [embed, done]
    embed >> cluster >> reattach >> train_ctr >> review
