"""Where everything lives under an output URI, declared once.

::

    <output>/images/<partition dirs>/part-<hash>-0.parquet      the images table
    <output>/instances/<partition dirs>/part-<hash>-0.parquet   the instances table
    <output>/_runs/<run_id>.json             the run record (config, versions, counts, timings)
    <output>/_runs/<run_id>.lease.json       the lease of the driver writing the run
    <output>/_runs/<run_id>.lease-clock      written to read the store's clock (lease ages)
    <output>/_runs/<run_id>.metrics.json     ``segpipe eval``'s COCO metrics of the run
    <output>/_runs/<run_id>.actors/<actor>.json   a model actor's start-up times (timeline)
    <output>/_commits/<run_id>/<unit>.json   a unit's commit marker (its files and counts)
    <output>/_staging/<run_id>/<unit>/       a unit's files before they are published
    <output>/_listing/<run_id>/              the listed input URIs, as Parquet shards

Readers (SQL engines, :mod:`segpipe.analytics`) only read the two tables; the folders that
start with ``_`` belong to the job (:mod:`segpipe.job`). Each function takes a ``base`` (an
output URI, or its path on its filesystem; ``""`` for a path relative to the output) and
returns the location under it.
"""

from __future__ import annotations

from segpipe.schema import IMAGES_SCHEMA, INSTANCES_SCHEMA

IMAGES_DIR = "images"
INSTANCES_DIR = "instances"
TABLES = (IMAGES_DIR, INSTANCES_DIR)  # publish order: an image's row before its instances
# Each table's columns (segpipe.schema), by the table's name.
TABLE_SCHEMAS = {IMAGES_DIR: IMAGES_SCHEMA, INSTANCES_DIR: INSTANCES_SCHEMA}
RUNS_DIR = "_runs"
COMMITS_DIR = "_commits"
STAGING_DIR = "_staging"
LISTING_DIR = "_listing"
LISTING_DONE = "_COMPLETE.json"  # written once every listing shard is


def _join(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}" if base else rel


def table(base: str, name: str) -> str:
    return _join(base, name)


def record(base: str, run_id: str) -> str:
    return _join(base, f"{RUNS_DIR}/{run_id}.json")


def lease(base: str, run_id: str) -> str:
    return _join(base, f"{RUNS_DIR}/{run_id}.lease.json")


def lease_clock(base: str, run_id: str) -> str:
    return _join(base, f"{RUNS_DIR}/{run_id}.lease-clock")


def metrics(base: str, run_id: str) -> str:
    return _join(base, f"{RUNS_DIR}/{run_id}.metrics.json")


def actor_timelines(base: str, run_id: str) -> str:
    return _join(base, f"{RUNS_DIR}/{run_id}.actors")


def commits(base: str, run_id: str) -> str:
    return _join(base, f"{COMMITS_DIR}/{run_id}")


def marker(base: str, run_id: str, stem: str) -> str:
    return f"{commits(base, run_id)}/{stem}.json"


def staging(base: str, run_id: str) -> str:
    return _join(base, f"{STAGING_DIR}/{run_id}")


def staged_unit(base: str, run_id: str, stem: str) -> str:
    return f"{staging(base, run_id)}/{stem}"


def listing(base: str, run_id: str) -> str:
    return _join(base, f"{LISTING_DIR}/{run_id}")


def listing_done(base: str, run_id: str) -> str:
    return f"{listing(base, run_id)}/{LISTING_DONE}"
