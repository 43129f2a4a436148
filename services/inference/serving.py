"""The serving core: a target, the served drafter, and speculative decoding per request.

- ``prepare`` turns a ``GenerationSpec`` (built by the routes from any of the three APIs) into
  token ids, sampling parameters and a proposer choice, raising request errors before any
  response starts.
- ``stream`` runs the request: at most ``max_concurrency`` at once (an asyncio semaphore), each
  decode cycle in a worker thread so the event loop stays free, and a check for a disconnected
  client between cycles (a gone client stops the generation).
- ``generate`` is ``stream`` run to the end.

The drafter lives in an immutable ``ServedDrafter`` holder: a request takes the holder once in
``prepare`` and keeps it, so ``swap_drafter`` can replace it at any time (the registry alias
follower, ``follower.py``, does so from its own thread).

The canary: ``set_candidate`` installs a second holder with a traffic share. ``prepare`` routes
that share of the requests that would use the production drafter's family (by the method they
name, or by default) to the candidate; each response names the version that served it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import anyio.to_thread
import torch

from draftopd.models.target import TargetModel, load_target
from draftopd.prompts import Prompt, render_prompt
from draftopd.speculative.engine import DecodeEngine, DecodeRun, Delta
from draftopd.speculative.proposers import LookupFirstProposer, NgramProposer, Proposer
from draftopd.speculative.sampling import SamplingParams
from draftopd.speculative.tree import DraftTree
from services.inference.capture import TrafficCapture
from services.inference.drafters import ServedDrafter, load_served_drafter
from services.inference.errors import (
    ClientGoneError,
    DrafterUnavailableError,
    InvalidRequestError,
    OverloadedError,
)
from services.inference.live import LiveCounters
from services.inference.metrics import RunRecord, ServiceMetrics
from services.inference.responses import Outcome
from services.inference.schemas import (
    DRAFTER_METHODS,
    DrafterInfo,
    SpeculativeMethod,
    SpeculativeStats,
    Usage,
)
from services.inference.settings import InferenceSettings
from services.inference.specs import GenerationSpec
from services.inference.status import FollowStatusSource, InferenceHealth

logger = logging.getLogger(__name__)

IsDisconnected = Callable[[], Awaitable[bool]]


class Admission:
    """A request's place among the admitted ones (running or waiting for a slot). ``release``
    is idempotent: the stream's end and the response's background task both call it, so a
    stream that never started (its client left before the first byte) frees its place too."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()


@dataclass(frozen=True)
class PreparedGeneration:
    spec: GenerationSpec
    prompt_ids: list[int]
    params: SamplingParams
    method: SpeculativeMethod
    num_draft_tokens: int  # 0 for method "none"
    lookup_first: int  # N of n-gram lookup ahead of the drafter; 0 = off (always 0 without one)
    draft_tree: str | None  # BRANCHxNODES of an eagle3 draft tree; None = chain drafts
    drafter: ServedDrafter | None  # the holder this request keeps (drafter methods only)
    received_at: float  # perf_counter() when the request was prepared
    admission: Admission  # its place among the admitted requests; released when it ends

    @property
    def drafter_version(self) -> str | None:
        """What the response reports: the drafter version, 'ngram', or None (plain decoding)."""
        if self.method in DRAFTER_METHODS:
            return self.drafter.version if self.drafter is not None else None
        return "ngram" if self.method == "ngram" else None

    @property
    def metrics_label(self) -> str:
        return self.drafter_version or "none"


@dataclass(frozen=True)
class Canary:
    """The candidate drafter and the share of requests routed to it."""

    drafter: ServedDrafter
    traffic: float


class InferenceService:
    def __init__(
        self,
        settings: InferenceSettings,
        target: TargetModel,
        drafter: ServedDrafter | None,
        metrics: ServiceMetrics,
    ) -> None:
        self.settings = settings
        self.target = target
        self.metrics = metrics
        self.engine = DecodeEngine(target, num_draft_tokens=settings.num_draft_tokens)
        self.started_at = int(time.time())
        self._drafter = drafter
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._admitted = 0  # requests running or waiting for a slot
        self._running = 0
        self.follower: FollowStatusSource | None = None  # set when following a registry alias
        self.capture = TrafficCapture.from_settings(settings)  # None unless capture_rate > 0
        self._canary: Canary | None = None
        self._route = random.Random()  # the canary's coin (not seeded: a share of live traffic)
        self.live: LiveCounters | None = None  # set when reporting live metrics to the registry

    @classmethod
    def load(cls, settings: InferenceSettings, metrics: ServiceMetrics) -> InferenceService:
        """Load the target and the configured local drafter (blocking: call it off the event
        loop). A registry drafter is loaded afterwards by the alias follower."""
        target = load_target(settings.target, device=settings.device, dtype=settings.dtype)
        target.new_decode_cache()  # builds the decode step now (kernel, packed weights), not in
        # the first request: /health says ready only once this is done
        drafter = (
            load_served_drafter(
                settings.drafter, target, random_architecture=settings.random_architecture
            )
            if settings.drafter
            else None
        )
        source = f"registry alias {settings.drafter_name}/{settings.drafter_alias}"
        logger.info(
            "inference ready: target=%s device=%s drafter=%s",
            settings.target,
            settings.device,
            source if settings.follows_registry else drafter.version if drafter else None,
        )
        return cls(settings, target, drafter, metrics)

    # -- the served drafter -----------------------------------------------------------------
    @property
    def drafter(self) -> ServedDrafter | None:
        return self._drafter

    def swap_drafter(self, drafter: ServedDrafter | None) -> None:
        """Serve ``drafter`` from now on; running requests keep the holder they started with."""
        self._drafter = drafter

    @property
    def canary(self) -> Canary | None:
        return self._canary

    def set_candidate(self, drafter: ServedDrafter | None, traffic: float) -> None:
        """Route ``traffic`` of the drafter requests to ``drafter`` (None or 0: no canary)."""
        self._canary = Canary(drafter, traffic) if drafter is not None and traffic > 0 else None
        self.metrics.canary_share.set(traffic if self._canary is not None else 0.0)

    def _routed(self, drafter: ServedDrafter | None, method: str) -> ServedDrafter | None:
        """The holder a drafter request uses: the canary's for its share, else ``drafter``."""
        canary = self._canary
        if (
            canary is not None
            and canary.drafter.architecture == method
            and self._route.random() < canary.traffic
        ):
            return canary.drafter
        return drafter

    def default_method(self, drafter: ServedDrafter | None) -> SpeculativeMethod:
        """The method of a request that names none, given the holder it took."""
        return self.settings.default_method_for(drafter.architecture if drafter else None)

    def health(self) -> InferenceHealth:
        drafter = self._drafter
        return InferenceHealth(
            target=self.settings.target,
            device=str(self.target.device),
            dtype=str(self.target.dtype).removeprefix("torch."),
            drafter_version=drafter.version if drafter else None,
            default_method=self.default_method(drafter),
            num_draft_tokens=self.settings.num_draft_tokens,
            registry=self.follower.status() if self.follower is not None else None,
        )

    def drafter_info(self) -> DrafterInfo:
        drafter = self._drafter
        return DrafterInfo(
            version=drafter.version if drafter else None,
            architecture=drafter.architecture if drafter else None,
            target=(drafter.built_for or self.settings.target) if drafter else None,
            path=drafter.path if drafter else None,
            draft_vocab_size=drafter.draft_vocab_size if drafter else None,
            num_draft_tokens=self.settings.num_draft_tokens,
            default_method=self.default_method(drafter),
            provenance=dict(drafter.provenance) if drafter else None,
        )

    # -- requests ---------------------------------------------------------------------------
    def prepare(self, spec: GenerationSpec) -> PreparedGeneration:
        limit = self.settings.max_new_tokens_limit
        if spec.max_new_tokens > limit:
            raise InvalidRequestError(
                (spec.max_tokens_field,),
                f"{spec.max_tokens_field} must be <= {limit} (the server's limit), "
                f"got {spec.max_new_tokens}",
                spec.max_new_tokens,
            )
        drafter = self._drafter  # read once: a swap from now on does not touch this request
        method = spec.method or self.default_method(drafter)
        if spec.lookup_first and method not in DRAFTER_METHODS:
            raise InvalidRequestError(
                ("speculative", "lookup_first"),
                f"lookup_first puts n-gram lookup ahead of a drafter; method {method!r} has none "
                f"(use {' or '.join(DRAFTER_METHODS)}, or lookup_first 0)",
                spec.lookup_first,
            )
        if spec.draft_tree not in (None, "chain"):
            self._check_tree_request(spec.draft_tree, method)
        if method in DRAFTER_METHODS:
            drafter = self._routed(drafter, method)
        if method in DRAFTER_METHODS and (drafter is None or drafter.architecture != method):
            raise DrafterUnavailableError(self._no_drafter_message(method, drafter))
        prompt_ids = self._prompt_ids(spec)
        self._check_context(spec, len(prompt_ids))
        try:
            params = SamplingParams(
                max_new_tokens=spec.max_new_tokens,
                temperature=spec.temperature,
                top_p=spec.top_p,
                top_k=spec.top_k,
                seed=spec.seed,
                stop=spec.stop,
                ignore_eos=spec.ignore_eos,
            )
        except ValueError as err:  # the schemas check the same bounds; this is a backstop
            raise InvalidRequestError((), str(err)) from err
        k = spec.num_draft_tokens or self.settings.num_draft_tokens
        return PreparedGeneration(
            spec=spec,
            prompt_ids=prompt_ids,
            params=params,
            method=method,
            num_draft_tokens=0 if method == "none" else k,
            lookup_first=self._lookup_first(spec, method),
            draft_tree=self._draft_tree(spec, method),
            drafter=drafter if method in DRAFTER_METHODS else None,
            received_at=time.perf_counter(),
            admission=self._admit(),
        )

    def _admit(self) -> Admission:
        """Admit a request, or refuse it (429) when every slot is busy and ``max_queued``
        requests already wait. Runs on the event loop: no lock is needed."""
        settings = self.settings
        if self._admitted >= settings.max_concurrency + settings.max_queued:
            self.metrics.rejected.inc()
            raise OverloadedError(
                f"all {settings.max_concurrency} generation slots are busy and "
                f"{settings.max_queued} requests are waiting; retry later",
                retry_after_s=settings.retry_after_s,
            )
        self._admitted += 1
        self._update_queue_metric()
        return Admission(self._leave)

    def _leave(self) -> None:
        self._admitted -= 1
        self._update_queue_metric()

    def _update_queue_metric(self) -> None:
        self.metrics.queue_depth.set(max(self._admitted - self._running, 0))

    async def generate(
        self, prepared: PreparedGeneration, *, is_disconnected: IsDisconnected
    ) -> Outcome:
        """Run to the end; raises ClientGoneError if the client left first."""
        outcome: Outcome | None = None
        async for event in self.stream(prepared, is_disconnected=is_disconnected):
            if isinstance(event, Outcome):
                outcome = event
        if outcome is None:
            raise ClientGoneError("the client disconnected before the generation finished")
        return outcome

    async def stream(
        self, prepared: PreparedGeneration, *, is_disconnected: IsDisconnected
    ) -> AsyncIterator[Delta | Outcome]:
        """Yield one Delta per decode cycle, then the Outcome (nothing more if the client left).

        The metrics are recorded, and the slot freed, before the Outcome is yielded.
        """
        run: DecodeRun | None = None
        self.metrics.in_flight.inc()
        try:
            async with self._slots:
                self._running += 1
                self._update_queue_metric()
                try:
                    run = self._start(prepared)
                    cycles = iter(run)
                    while not await is_disconnected():  # a gone client stops decoding here
                        delta = await anyio.to_thread.run_sync(self._next_cycle, cycles)
                        if delta is None:
                            break
                        yield delta
                finally:
                    self._running -= 1
        finally:
            self.metrics.in_flight.dec()
            prepared.admission.release()
            if run is not None:
                self._record(prepared, run)
        if run.finish_reason is not None:
            yield self._outcome(prepared, run)

    # -- helpers ----------------------------------------------------------------------------
    def _no_drafter_message(self, method: str, drafter: ServedDrafter | None) -> str:
        settings = self.settings
        needs = f"speculative.method {method!r} needs a {method} drafter"
        if drafter is not None:
            return (
                f"{needs}, and this server serves {drafter.version}, a {drafter.architecture} "
                f"drafter; use {drafter.architecture!r}, 'ngram' or 'none'"
            )
        if settings.follows_registry:
            return (
                f"{needs}, and none is loaded yet from registry alias "
                f"{settings.drafter_name}/{settings.drafter_alias} (see GET /health, field "
                "registry); use 'ngram' or 'none'"
            )
        return (
            f"{needs}, and this server has none loaded (setting DRAFTOPD_INFERENCE_DRAFTER); "
            "use 'ngram' or 'none'"
        )

    def _next_cycle(self, cycles: Iterator[Delta]) -> Delta | None:
        """Run one decode cycle (in a worker thread); None when the run has finished."""
        threads = self.settings.torch_threads
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)  # intra-op threads are a per-thread OpenMP setting
        return next(cycles, None)

    def _prompt_ids(self, spec: GenerationSpec) -> list[int]:
        if spec.prompt_ids is not None:
            vocab = self.target.vocab_size
            bad = [i for i in spec.prompt_ids if not 0 <= i < vocab]
            if bad:
                raise InvalidRequestError(
                    ("prompt",), f"token ids must be in [0, {vocab}), got {bad[:5]}", bad[:5]
                )
            return list(spec.prompt_ids)
        tokenizer = self.target.tokenizer
        if tokenizer is None:
            raise InvalidRequestError(("prompt",), "the target has no tokenizer: send token ids")
        field = "messages" if spec.messages is not None else "prompt"
        prompt = Prompt(
            id="request",
            messages=spec.messages,
            text=spec.prompt,
            source="messages" if spec.messages is not None else "prompt",
        )
        try:
            ids = render_prompt(tokenizer, prompt, chat=spec.messages is not None)
        except ValueError as err:  # e.g. messages for a target without a chat template
            raise InvalidRequestError((field,), str(err)) from err
        if not ids:
            raise InvalidRequestError((field,), f"{field} encodes to zero tokens")
        return ids

    def _check_context(self, spec: GenerationSpec, prompt_tokens: int) -> None:
        context = getattr(self.target.config, "max_position_embeddings", None)
        if not isinstance(context, int):
            return
        field = "messages" if spec.messages is not None else "prompt"
        if prompt_tokens >= context:
            raise InvalidRequestError(
                (field,), f"the prompt has {prompt_tokens} tokens; the context is {context}"
            )
        if prompt_tokens + spec.max_new_tokens > context:
            raise InvalidRequestError(
                (spec.max_tokens_field,),
                f"prompt ({prompt_tokens} tokens) + {spec.max_tokens_field} "
                f"({spec.max_new_tokens}) exceeds the target's context of {context} tokens",
                spec.max_new_tokens,
            )

    def _start(self, prepared: PreparedGeneration) -> DecodeRun:
        proposer: Proposer | None = None
        if prepared.method in DRAFTER_METHODS:
            assert prepared.drafter is not None  # checked in prepare
            drafter = prepared.drafter.drafter
            tree = DraftTree.parse(prepared.draft_tree) if prepared.draft_tree else None
            proposer = drafter.proposer(  # per-request state
                weights=self.settings.draft_weights,
                stop_below=0.0 if tree else self.settings.draft_stop_below,
                tree=tree,
            )
        elif prepared.method == "ngram":
            proposer = NgramProposer()
        k = prepared.num_draft_tokens
        if proposer is not None and prepared.lookup_first:
            proposer = LookupFirstProposer(
                proposer, lookup_tokens=prepared.lookup_first, drafter_tokens=k
            )
            k = proposer.num_draft_tokens
        return self.engine.start(
            prepared.prompt_ids, prepared.params, proposer=proposer, num_draft_tokens=k
        )

    def _lookup_first(self, spec: GenerationSpec, method: str) -> int:
        """The request's N, else the server's; 0 where no drafter runs."""
        if method not in DRAFTER_METHODS:
            return 0
        return spec.lookup_first if spec.lookup_first is not None else self.settings.lookup_first

    def _check_tree_request(self, tree: str, method: str) -> None:
        """A request's explicit draft tree needs an eagle3 drafter and the lean target step."""
        problem = None
        if method != "eagle3":
            problem = f"draft trees are drafted by eagle3 drafters; method {method!r} drafts none"
        elif self.engine.target.step != "lean":
            problem = (
                "draft trees need the target's lean decode step; this server runs Hugging "
                "Face's forward"
            )
        if problem is not None:
            raise InvalidRequestError(
                ("speculative", "draft_tree"), f"{problem} (use draft_tree 'chain')", tree
            )

    def _draft_tree(self, spec: GenerationSpec, method: str) -> str | None:
        """The request's tree, else the server's; None (chain) where no eagle3 drafter runs or
        where the target's decode step cannot score a tree (Hugging Face's)."""
        if method != "eagle3" or self.engine.target.step != "lean":
            return None
        tree = spec.draft_tree if spec.draft_tree is not None else self.settings.draft_tree
        return None if tree == "chain" else tree

    def _outcome(self, prepared: PreparedGeneration, run: DecodeRun) -> Outcome:
        result = run.result
        stats = result.stats
        completion = len(result.token_ids)
        prompt = len(prepared.prompt_ids)
        speculative = SpeculativeStats(
            method=prepared.method,
            num_draft_tokens=prepared.num_draft_tokens,
            lookup_first=prepared.lookup_first,
            lookup_cycles=stats.lookup_cycles,
            draft_tree=prepared.draft_tree,
            tree_cycles=stats.tree_cycles,
            tau=stats.tau,
            cycles=stats.cycles,
            drafts=stats.drafts,
            draft_tokens=stats.draft_tokens,
            accepted_tokens=stats.accepted_tokens,
            accepted_by_position=list(stats.accepted_by_position),
            tokens_per_s=completion / stats.decode_s if stats.decode_s > 0 else 0.0,
            prefill_s=stats.prefill_s,
            decode_s=stats.decode_s,
        )
        return Outcome(
            text=result.text,
            token_ids=list(result.token_ids),
            finish_reason="stop" if result.finish_reason == "stop" else "length",
            usage=Usage(
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=prompt + completion,
            ),
            drafter_version=prepared.drafter_version,
            speculative=speculative,
        )

    def _record(self, prepared: PreparedGeneration, run: DecodeRun) -> None:
        finished = run.finish_reason is not None
        record = RunRecord(
            drafter_label=prepared.metrics_label,
            stats=run.stats,
            generated_tokens=run.visible,
            finished=finished,
        )
        seconds = time.perf_counter() - prepared.received_at
        self.metrics.record_run(prepared.spec.endpoint, record, seconds)
        if finished and self.live is not None and prepared.drafter is not None:
            self.live.add(prepared.drafter.version, run.stats, run.visible)
        if finished and self.capture is not None:
            self.capture.offer(
                prepared.prompt_ids,
                run.stats,
                drafter_version=prepared.drafter_version,
                method=prepared.method,
                endpoint=prepared.spec.endpoint,
                completion_tokens=run.visible,
            )
        if not finished:
            logger.info(
                "%s: client gone, generation stopped after %d tokens",
                prepared.spec.endpoint,
                run.visible,
            )


def set_torch_threads(threads: int | None) -> None:
    """Use ``threads`` intra-op threads (process default for new threads, and this thread)."""
    if threads is not None:
        torch.set_num_threads(threads)
