"""HTTP routes of the registry (docs/design.md §4): drafters, versions and artifacts, metrics,
aliases.
Train jobs are in ``train_api.py``. Thin: validate, call one function, return a response model.

Writes need the bearer token; reads are open unless ``open_reads`` is false (``settings.py``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Path, Query, Response, UploadFile, status
from fastapi.exceptions import RequestValidationError

from services.registry import aliases, artifacts, live, repository
from services.registry.artifacts import SHA256_HEADER, Provenance
from services.registry.deps import (
    BaseUrlDep,
    DrafterDep,
    EventsDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    VersionDep,
    require_read,
    require_write,
)
from services.registry.migrate import current_revision
from services.registry.schemas import (
    ALIAS_PATTERN,
    MAX_INT,
    AliasEventOut,
    AliasOut,
    AliasUpdate,
    DrafterCreate,
    DrafterOut,
    HealthOut,
    LiveAck,
    LiveOut,
    LiveReport,
    MetricCreate,
    MetricOut,
    VersionOut,
)

AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing bearer token."},
    403: {"description": "Wrong bearer token, or no api_token configured."},
    422: {"description": "Invalid field; detail[].loc names it."},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "Unknown drafter or version."}}
PRODUCTION = "production"
AliasName = Annotated[str, Path(pattern=ALIAS_PATTERN, description="e.g. 'production'.")]

router = APIRouter()
reads = APIRouter(dependencies=[Depends(require_read)], responses=AUTH_ERRORS)
writes = APIRouter(dependencies=[Depends(require_write)], responses=AUTH_ERRORS)


@router.get("/health", response_model=HealthOut, summary="Liveness and the schema revision")
def health(session: SessionDep) -> HealthOut:
    """Always open. 503 when the database is unreachable."""
    return HealthOut(
        status="ok",
        database=session.get_bind().dialect.name,
        schema_revision=current_revision(session.connection()),
    )


@writes.post(
    "/drafters",
    response_model=DrafterOut,
    status_code=status.HTTP_201_CREATED,
    responses={409: {"description": "A drafter with this name exists."}},
    summary="Create a drafter",
)
def create_drafter(body: DrafterCreate, session: SessionDep) -> DrafterOut:
    return DrafterOut.from_row(repository.create_drafter(session, body))


@reads.get("/drafters", response_model=list[DrafterOut], summary="List drafters (by name)")
def list_drafters(session: SessionDep) -> list[DrafterOut]:
    return [DrafterOut.from_row(row) for row in repository.list_drafters(session)]


@reads.get("/drafters/{name}", response_model=DrafterOut, responses=NOT_FOUND, summary="A drafter")
def get_drafter(drafter: DrafterDep) -> DrafterOut:
    return DrafterOut.from_row(drafter)


@writes.post(
    "/drafters/{name}/versions",
    response_model=VersionOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        **NOT_FOUND,
        400: {"description": "Not a tar of a safetensors checkpoint, or pickle content."},
        413: {"description": "Larger than max_artifact_bytes."},
    },
    summary="Upload a checkpoint archive as the next version",
)
def upload_version(
    drafter: DrafterDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    base_url: BaseUrlDep,
    artifact: Annotated[
        UploadFile,
        File(
            description="tar or tar.gz of the checkpoint directory's contents: "
            "model.safetensors + config.json at the archive root."
        ),
    ],
    parent_version: Annotated[
        int | None, Form(ge=1, le=MAX_INT, description="Trained from (number).")
    ] = None,
    job_id: Annotated[str | None, Form(description="The train job that produced it.")] = None,
    step: Annotated[int | None, Form(ge=0, le=MAX_INT, description="The job's step.")] = None,
) -> VersionOut:
    """The server streams the upload to its store, computing the sha256 on the way, checks the
    archive, and numbers the version 1, 2, 3, ... per drafter."""
    version = artifacts.register_upload(
        session,
        store,
        drafter,
        artifact.file,
        filename=artifact.filename,
        provenance=Provenance(parent_version=parent_version, job_id=job_id, step=step),
        max_bytes=settings.max_artifact_bytes,
        max_unpacked_bytes=settings.max_unpacked_artifact_bytes,
    )
    return VersionOut.from_row(version, base_url)


@reads.get(
    "/drafters/{name}/versions",
    response_model=list[VersionOut],
    responses=NOT_FOUND,
    summary="A drafter's versions (oldest first)",
)
def list_versions(
    drafter: DrafterDep, session: SessionDep, base_url: BaseUrlDep
) -> list[VersionOut]:
    return [VersionOut.from_row(v, base_url) for v in repository.list_versions(session, drafter)]


@reads.get(
    "/drafters/{name}/versions/{version}",
    response_model=VersionOut,
    responses=NOT_FOUND,
    summary="One version",
)
def get_version(version: VersionDep, base_url: BaseUrlDep) -> VersionOut:
    return VersionOut.from_row(version, base_url)


@reads.get(
    "/drafters/{name}/versions/{version}/artifact",
    response_class=Response,
    responses={
        **NOT_FOUND,
        200: {
            "content": {"application/x-tar": {}, "application/gzip": {}},
            "headers": {SHA256_HEADER: {"description": "Hex sha256 of the body."}},
            "description": "The checkpoint archive as uploaded.",
        },
    },
    summary="Download a version's artifact",
)
def download_artifact(version: VersionDep, store: StoreDep) -> Response:
    """Streamed; check the body against ``X-Content-SHA256`` before using it."""
    return artifacts.artifact_response(store, version)


@writes.post(
    "/drafters/{name}/versions/{version}/metrics",
    response_model=MetricOut,
    status_code=status.HTTP_201_CREATED,
    responses=NOT_FOUND,
    summary="Attach a benchmark result to a version",
)
def add_metric(version: VersionDep, body: MetricCreate, session: SessionDep) -> MetricOut:
    return MetricOut.from_row(repository.add_metric(session, version, body))


@reads.get(
    "/drafters/{name}/versions/{version}/metrics",
    response_model=list[MetricOut],
    responses=NOT_FOUND,
    summary="A version's benchmark results (oldest first)",
)
def list_metrics(version: VersionDep, session: SessionDep) -> list[MetricOut]:
    return [MetricOut.from_row(row) for row in repository.list_metrics(session, version)]


@writes.put(
    "/drafters/{name}/aliases/{alias}",
    response_model=AliasOut,
    responses=NOT_FOUND,
    summary="Point an alias at a version (publishes the change)",
)
def put_alias(
    drafter: DrafterDep,
    alias: AliasName,
    body: AliasUpdate,
    session: SessionDep,
    events: EventsDep,
    base_url: BaseUrlDep,
) -> AliasOut:
    """Creates or moves the alias, then publishes it as JSON on the Redis channel
    ``draftopd:aliases``. An unreachable Redis does not fail the request (subscribers poll).

    ``traffic`` gives the alias a share of requests: inference routes that share to
    ``candidate`` (the canary), and the registry's policy promotes or discards it by live τ."""
    if body.traffic is not None and alias == PRODUCTION:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body", "traffic"), "input": body.traffic,
              "msg": "production serves every request the canary does not: it takes no "
                     "traffic share (give the share to 'candidate')"}]
        )  # fmt: skip
    return aliases.move_alias(
        session, events, drafter, alias, body.version, base_url=base_url, traffic=body.traffic
    )


@writes.post(
    "/drafters/{name}/versions/{version}/live-metrics",
    response_model=LiveAck,
    status_code=status.HTTP_201_CREATED,
    responses=NOT_FOUND,
    summary="Report live counters of a version (inference instances)",
)
def report_live(version: VersionDep, body: LiveReport, session: SessionDep) -> LiveAck:
    """Counters since the instance's previous report. A repeated (instance, seq) is ignored
    (``stored: false``), so a report retried after a lost answer counts once."""
    return LiveAck(stored=live.record(session, version, body))


@reads.get(
    "/drafters/{name}/versions/{version}/live-metrics",
    response_model=LiveOut,
    responses=NOT_FOUND,
    summary="A version's live tau and tokens/s, measured on served traffic",
)
def get_live(
    drafter: DrafterDep,
    version: VersionDep,
    session: SessionDep,
    since: Annotated[datetime | None, Query(description="Only reports from then on.")] = None,
) -> LiveOut:
    since = _aware(since)
    return live.live_out(drafter.name, version, live.stats(session, version.id, since=since), since)


@reads.get(
    "/drafters/{name}/live-metrics",
    response_model=list[LiveOut],
    responses=NOT_FOUND,
    summary="Live figures of every version that has served traffic",
)
def list_live(
    drafter: DrafterDep,
    session: SessionDep,
    since: Annotated[datetime | None, Query(description="Only reports from then on.")] = None,
) -> list[LiveOut]:
    since = _aware(since)
    rows = []
    for version in repository.list_versions(session, drafter):
        figures = live.stats(session, version.id, since=since)
        if figures.reports:
            rows.append(live.live_out(drafter.name, version, figures, since))
    return rows


def _aware(moment: datetime | None) -> datetime | None:
    """A query timestamp without an offset is taken as UTC."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


@reads.get(
    "/drafters/{name}/aliases",
    response_model=list[AliasOut],
    responses=NOT_FOUND,
    summary="A drafter's aliases",
)
def list_aliases(drafter: DrafterDep, session: SessionDep, base_url: BaseUrlDep) -> list[AliasOut]:
    return [AliasOut.from_row(row, base_url) for row in repository.list_aliases(session, drafter)]


@reads.get(
    "/drafters/{name}/events",
    response_model=list[AliasEventOut],
    responses=NOT_FOUND,
    summary="A drafter's alias moves, newest first (who served what, when, and why)",
)
def list_events(
    drafter: DrafterDep,
    session: SessionDep,
    alias: Annotated[
        str | None, Query(pattern=ALIAS_PATTERN, description="Only this alias.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AliasEventOut]:
    rows = repository.list_alias_events(session, drafter, alias=alias, limit=limit)
    return [AliasEventOut.from_row(row, drafter.name) for row in rows]


@reads.get(
    "/drafters/{name}/aliases/{alias}",
    response_model=AliasOut,
    responses={404: {"description": "Unknown drafter or alias."}},
    summary="Resolve an alias (what consumers poll)",
)
def get_alias(
    drafter: DrafterDep, alias: AliasName, session: SessionDep, base_url: BaseUrlDep
) -> AliasOut:
    return AliasOut.from_row(repository.get_alias(session, drafter, alias), base_url)
