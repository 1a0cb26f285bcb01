"""Airflow DAG: the daily COURIER feature refresh (docs/schedule.md). Not imported by the tests.

Variables: courier_home (the checkout with .venv), courier_conf (a config YAML, e.g. conf/prod.yaml).
"""
from __future__ import annotations

import datetime as dt

from airflow import DAG
from airflow.models import Variable
from airflow.operators.bash import BashOperator
from airflow.operators.python import BranchPythonOperator

HOME = "{{ var.value.courier_home }}"
CONF = "{{ var.value.courier_conf }}"
SUBMIT = f"cd {HOME} && .venv/bin/spark-submit"


def _recluster_due(ds: str, dag_run=None, **_) -> str:
    """Branch: re-cluster when asked ({"recluster": true}) or when today's refresh run said it is due."""
    if dag_run is not None and (dag_run.conf or {}).get("recluster"):
        return "embed_items"
    import mlflow

    from etl.config import load_config
    from etl.tracking import setup_mlflow

    setup_mlflow(load_config(Variable.get("courier_conf")))
    runs = mlflow.search_runs(filter_string=f"tags.`courier.job` = 'refresh_features' and tags.`courier.date` = '{ds}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    due = not runs.empty and runs.iloc[0].get("tags.courier.recluster_due") == "true"
    return "embed_items" if due else "done"


with DAG(
    dag_id="courier_feature_refresh",
    schedule="30 2 * * *",  # daily, UTC, after the day's log has landed
    start_date=dt.datetime(2026, 11, 20),
    catchup=True,  # backfills run day by day, in order (max_active_runs=1)
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=10)},  # safe: every job is idempotent
    tags=["courier"],
) as dag:
    build_samples = BashOperator(task_id="build_samples",
                                 bash_command=f"{SUBMIT} jobs/build_samples.py --conf {CONF} --date {{{{ ds }}}}")
    refresh = BashOperator(task_id="refresh_features",
                           bash_command=f"{SUBMIT} jobs/refresh_features.py --conf {CONF} --date {{{{ ds }}}}")
    branch = BranchPythonOperator(task_id="recluster_due", python_callable=_recluster_due)
    embed = BashOperator(task_id="embed_items", bash_command=f"{SUBMIT} jobs/embed_items.py --conf {CONF}")
    cluster = BashOperator(task_id="build_clusters",
                           bash_command=f"{SUBMIT} jobs/build_clusters.py --conf {CONF} --skip-if-current")
    reattach = BashOperator(task_id="attach_features", bash_command=(
        f"{SUBMIT} jobs/attach_features.py --conf {CONF} --date {{{{ dag.start_date.strftime('%Y-%m-%d') }}}} "
        f"--end-date {{{{ ds }}}}"))
    done = BashOperator(task_id="done", bash_command="true")
    build_samples >> refresh >> branch >> [embed, done]
    embed >> cluster >> reattach
