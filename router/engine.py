"""The engine loop: schedule, execute, update.

`LLMEngine` owns the gateway model, the KV cache, the scheduler and the sampler; the routed
experts are reached through the dispatcher it is given (in-process shards, gRPC workers, or a
collective group). It is synchronous: `step()` runs one batch and returns the tokens made.
An ERNIE-4.5-VL engine also takes images with a request (`router/multimodal.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch
from expertmesh.ernie.checkpoint import CheckpointReader
from expertmesh.ernie.config import ModelConfig
from expertmesh.ernie.devices import compute_dtype
from expertmesh.ernie.image import ImageInputs, ImageSettings, preprocess
from expertmesh.workers.experts import ExpertShard
from expertmesh.workers.placement import ExpertPlacement

from .attention_metadata import build_step
from .dispatch import Dispatcher, LocalDispatcher
from .events import ErrorKind, TokenEvent, error_event
from .model import GatewayModel
from .multimodal import MultimodalPrompt, build_multimodal_step, multimodal_prompt
from .sampling import History, SamplingParams, base_seed, sample, step_seed
from .scheduler import ScheduledSeq, Scheduler, SchedulerConfig, Sequence
from .structured import Grammars, Matcher, StructuredOutputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    dtype: str = "auto"  # float32, bfloat16, float16; auto: float32 on CPU, the checkpoint's on GPU
    device: str = "cpu"  # where the gateway computes
    max_num_seqs: int = 64  # sequences in one batch at most
    max_tokens_per_step: int = 2048  # tokens through the model in one step (prefill chunking)
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_tokens: int = 65536  # KV-cache budget in tokens over all sequences
    max_model_len: int | None = None  # prompt + output limit; default: the smaller of the
    # checkpoint's max_position_embeddings and the cache budget

    def torch_dtype(self, model_cfg: ModelConfig) -> torch.dtype:
        return compute_dtype(self.dtype, self.device, model_cfg.dtype)


class RequestError(ValueError):
    """A request the engine cannot take: bad token ids, too long a prompt, a duplicate id."""


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class _Request:
    seq: Sequence
    params: SamplingParams
    seed: int  # the draw at output position k is seeded with step_seed(seed, k)
    stop_ids: frozenset[int]
    mm: MultimodalPrompt | None = None  # a VL prompt's images, 3D positions, vision tokens
    generator: torch.Generator = field(default_factory=torch.Generator)
    history: History | None = None  # for penalties and min_tokens (`history_for_next`)
    grammar: Matcher | None = None  # a structured answer's state
    prompt_logprobs: list | None = None  # gathered chunk by chunk; sent with the first token

    def history_for_next(self, vocab: int) -> History | None:
        """Where the params need it: the prompt's tokens and the output's counts so far (made
        at the first draw, then kept up to date by `appended`)."""
        if not self.params.penalized:
            return None
        if self.history is None:
            seq = self.seq
            prompt, output = seq.token_ids[: seq.num_prompt], seq.token_ids[seq.num_prompt :]
            self.history = History(vocab, prompt, output, self.stop_ids)
        return self.history

    def appended(self, token: int) -> bool:
        """Append a drawn token; True if it completes a structured answer."""
        self.seq.token_ids.append(token)
        if self.history is not None:
            self.history.add(token)
        return self.grammar is not None and self.grammar.accept(token) and self.grammar.done

    def generator_for_next(self) -> torch.Generator:
        if not self.params.greedy:
            self.generator.manual_seed(step_seed(self.seed, self.seq.num_generated))
        return self.generator


class LLMEngine:
    def __init__(
        self,
        model: GatewayModel,
        dispatcher: Dispatcher,
        model_cfg: ModelConfig,
        cfg: EngineConfig = EngineConfig(),
        image_settings: ImageSettings | None = None,
        grammars: Grammars | None = None,
    ):
        """grammars: structured output's compiler for the checkpoint's tokenizer (else
        structured requests are refused)."""
        self.model, self.dispatcher, self.model_cfg, self.cfg = model, dispatcher, model_cfg, cfg
        self.grammars = grammars
        self.image_settings = image_settings or ImageSettings()  # for images given as PIL
        self.device = torch.device(cfg.device)
        dtype = next(model.parameters()).dtype
        num_blocks = -(-cfg.kv_cache_tokens // cfg.block_size)
        shape = (
            model_cfg.num_layers,
            num_blocks * cfg.block_size,
            model_cfg.num_kv_heads,
            model_cfg.head_dim,
        )
        self.kv = (
            torch.zeros(shape, dtype=dtype, device=self.device),  # k: [layers, slots, kv_heads, D]
            torch.zeros(shape, dtype=dtype, device=self.device),  # v
        )
        self.max_model_len = min(
            cfg.max_model_len or model_cfg.max_position_embeddings,
            model_cfg.max_position_embeddings,
            num_blocks * cfg.block_size,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(num_blocks, cfg.block_size, cfg.max_num_seqs, cfg.max_tokens_per_step)
        )
        self.requests: dict[str, _Request] = {}
        # tokens routed to each expert in each MoE layer, since start: [moe_layers, E] (VL: 2E)
        self.expert_counts = torch.zeros(
            len(model_cfg.moe_layers), model_cfg.num_experts, dtype=torch.long
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        cfg: EngineConfig = EngineConfig(),
        num_shards: int = 1,
        placement: ExpertPlacement | None = None,
    ) -> LLMEngine:
        """An engine whose expert shards all live in this process (VL: each shard holds text
        and vision experts); images given as PIL are preprocessed with the checkpoint's
        `preprocessor_config.json`."""
        model_cfg = ModelConfig.from_dir(path)
        groups = 2 if model_cfg.is_vl else 1
        placement = placement or ExpertPlacement.contiguous(
            model_cfg.num_experts, num_shards, groups
        )
        dtype = cfg.torch_dtype(model_cfg)
        with CheckpointReader(path) as reader:
            model = GatewayModel.load(reader, model_cfg, dtype, cfg.device)
            shards = [
                ExpertShard.load(reader, model_cfg, placement.experts_of(s), dtype, cfg.device)
                for s in range(placement.num_shards)
            ]
        settings = ImageSettings.from_dir(path)
        grammars = Grammars(path, model_cfg)
        return cls(model, LocalDispatcher(placement, shards), model_cfg, cfg, settings, grammars)

    # -- requests ---------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_ids: Seq[int],
        params: SamplingParams,
        images=None,
        resume_ids: Seq[int] = (),
    ) -> None:
        """images (VL): PIL images or ImageInputs, one per image placeholder in the prompt, in
        order; each placeholder is expanded to its image's token count.

        resume_ids: output tokens the request already has (it ran elsewhere and moved here):
        they are recomputed with the prompt and count as output (max_tokens, seeded draws), so
        the request continues exactly where it stopped."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running")
        prompt, mm = self._prompt(prompt_ids, images)
        if len(prompt) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt)} tokens; this model's context is "
                f"{self.max_model_len} tokens including the output"
            )
        self._checked_ids([t for t, _ in params.logit_bias], what="logit_bias token ids")
        max_tokens = min(params.max_tokens, self.max_model_len - len(prompt))
        resumed = self._checked_ids(resume_ids)
        if len(resumed) >= max_tokens:
            raise RequestError(f"nothing left to generate after {len(resumed)} resumed tokens")
        seq = Sequence(request_id, prompt + resumed, max_tokens, num_prompt=len(prompt))
        stop = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop |= set(self.model_cfg.eos_token_ids)
        try:
            self.scheduler.add(seq)
        except ValueError as e:
            raise RequestError(str(e)) from e
        grammar = self._grammar(params, resumed)
        self.requests[request_id] = _Request(
            seq, params, base_seed(params.seed), frozenset(stop), mm, grammar=grammar
        )

    def _grammar(self, params: SamplingParams, resumed: list[int]) -> Matcher | None:
        if params.structured is None:
            return None
        if self.grammars is None:
            raise RequestError("this engine has no tokenizer for structured output")
        try:
            return self.grammars.matcher(params.structured, replay=resumed)
        except StructuredOutputError as e:
            raise RequestError(str(e)) from e

    def _prompt(self, prompt_ids: Seq[int], images) -> tuple[list[int], MultimodalPrompt | None]:
        """Checked token ids, placeholders expanded, and the VL state of the prompt."""
        prompt = self._checked_ids(prompt_ids)
        if not prompt:
            raise RequestError("the prompt is empty")
        try:
            if images is not None and not isinstance(images, ImageInputs):
                images = preprocess(images, self.image_settings) if len(images) else None
            return multimodal_prompt(prompt, self.model_cfg, images)
        except Exception as e:  # an unreadable image, placeholders that do not pair up, ...
            raise RequestError(str(e)) from e

    def _checked_ids(self, ids: Seq[int], what: str = "token ids") -> list[int]:
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.model_cfg.vocab_size]
        if bad:
            raise RequestError(
                f"{what} {bad[:5]} are outside the vocabulary [0, {self.model_cfg.vocab_size})"
            )
        return ids

    def _mm_of(self, seq_id: str) -> MultimodalPrompt | None:
        req = self.requests.get(seq_id)
        return req.mm if req is not None else None

    def abort(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req.seq)
        return True

    def fail_running(
        self, message: str, kind: ErrorKind = ErrorKind.UNAVAILABLE
    ) -> list[TokenEvent]:
        """End every running request with an error (its step could not be completed)."""
        events = []
        for seq in list(self.scheduler.running):
            self.abort(seq.seq_id)
            events.append(error_event(seq.seq_id, kind, message))
        return events

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- the loop ---------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Schedule, run the model once, sample, update. Returns the tokens made."""
        plan = self.scheduler.schedule()
        if not plan:
            return []
        input_ids, meta = build_step(plan, self.cfg.block_size, self.device)
        mm = build_multimodal_step(plan, self._mm_of, self.model.encode_images, self.device)
        spans = self._prompt_logprob_rows(plan, meta)
        logits = self.model(input_ids, meta, self.kv, self.dispatcher, mm)  # [B, V] or [R, V]
        if spans is not None:
            logits = self._gather_prompt_logprobs(plan, logits.cpu(), spans)  # -> [B, V]
        self._count_routing()
        self.scheduler.advance(plan)
        return self._update(plan, logits.cpu(), meta.last_index)

    def _prompt_logprob_rows(self, plan: list[ScheduledSeq], meta) -> list | None:
        """Where a sequence asking for prompt logprobs has prompt tokens in this step, logits
        for all of its rows (`meta.logit_index`); per sequence (first row, rows, whether it
        wants them)."""
        want = [
            self.requests[s.seq.seq_id].params.prompt_logprobs is not None
            and s.seq.num_computed < s.seq.num_prompt
            for s in plan
        ]
        if not any(want):
            return None
        index, spans = [], []
        for s, w, last in zip(plan, want, meta.last_index.tolist(), strict=True):
            first = last - s.num_tokens + 1 if w else last
            spans.append((len(index), last - first + 1, w))
            index.extend(range(first, last + 1))
        meta.logit_index = torch.tensor(index, device=meta.last_index.device)
        return spans

    def _gather_prompt_logprobs(self, plan, logits: torch.Tensor, spans) -> torch.Tensor:
        """logits: [R, V] over `spans`; keeps the prompt tokens' logprobs of this step's
        chunks and returns the last row of each sequence: [B, V]."""
        for s, (r0, n, wanted) in zip(plan, spans, strict=True):
            if not wanted:
                continue
            req, seq = self.requests[s.seq.seq_id], s.seq
            k = req.params.prompt_logprobs
            p0 = seq.num_computed  # row j of the chunk predicts the token at p0 + j + 1
            m = min(n, seq.num_prompt - 1 - p0)
            if req.prompt_logprobs is None:
                req.prompt_logprobs = [None]  # the first token has no context
            if m <= 0:
                continue
            lp = torch.log_softmax(logits[r0 : r0 + m], dim=-1)  # [m, V]
            ids = torch.tensor(seq.token_ids[p0 + 1 : p0 + 1 + m])  # [m]
            chosen = lp.gather(1, ids[:, None])[:, 0].tolist()
            tops = [[] for _ in range(m)]
            if k:
                vals, top_ids = torch.topk(lp, min(k, lp.shape[-1]))
                tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), vals.tolist())]
            req.prompt_logprobs += [(c, t) for c, t in zip(chosen, tops)]
        return logits[[r0 + n - 1 for r0, n, _ in spans]]

    def _update(self, plan: list[ScheduledSeq], logits, last_index) -> list[TokenEvent]:
        rows = [i for i, s in enumerate(plan) if s.samples]
        if not rows:
            return []
        reqs = [self.requests[plan[i].seq.seq_id] for i in rows]
        gens = [r.generator_for_next() for r in reqs]
        histories = [r.history_for_next(logits.shape[-1]) for r in reqs]
        grammars = [r.grammar for r in reqs]
        try:
            sampled = sample(logits[rows], [r.params for r in reqs], gens, histories, grammars)
        except Exception:  # one request's draw must not end its batchmates' requests
            log.exception("sampling a batch failed; drawing each request alone")
            sampled = [self._sample_alone(logits[i], r) for i, r in zip(rows, reqs)]
        routing = self._routing(reqs, last_index, rows)
        events = []
        for req, s, experts in zip(reqs, sampled, routing, strict=True):
            seq = req.seq
            if isinstance(s, Exception):
                self.abort(seq.seq_id)
                events.append(error_event(seq.seq_id, ErrorKind.INTERNAL, f"internal error: {s}"))
                continue
            complete = req.appended(s.token)
            reason = None
            if s.token in req.stop_ids or complete:
                reason = "stop"
            elif seq.num_generated >= seq.max_tokens:
                reason = "length"
            ev = TokenEvent(seq.seq_id, s.token, s.logprob, s.top, experts, reason)
            if req.prompt_logprobs is not None:  # sent once, with the first token
                ev.prompt_logprobs, req.prompt_logprobs = req.prompt_logprobs, None
            events.append(ev)
            if reason:
                self.scheduler.finish(seq)
                del self.requests[seq.seq_id]
        return events

    def _sample_alone(self, logits: torch.Tensor, req: _Request):
        """logits: [V]. The request's draw on its own, or the exception it raises (the step's
        generator is re-seeded, so a draw again gives what the batch would have given)."""
        try:
            history = req.history_for_next(logits.shape[-1])
            gen = req.generator_for_next()
            return sample(logits[None], [req.params], [gen], [history], [req.grammar])[0]
        except Exception as e:
            log.exception("sampling request %s failed", req.seq.seq_id)
            return e

    def _count_routing(self) -> None:
        routing = self.model.routing()  # per MoE layer: ids [T, k]
        if not routing:
            return
        e = self.model_cfg.num_experts
        ids = torch.stack(routing).flatten(1).cpu()  # [L, T*k]
        ids = ids + e * torch.arange(len(routing))[:, None]  # layer i's ids -> i*E + id
        self.expert_counts += torch.bincount(ids.flatten(), minlength=len(routing) * e).view(-1, e)

    def _routing(self, reqs: list[_Request], last_index: torch.Tensor, rows: list[int]) -> list:
        if not any(r.params.return_routed_experts for r in reqs):
            return [None] * len(reqs)
        index = last_index.tolist()  # one device sync, not one per row
        token_rows = [index[i] for i in rows]
        layers = [ids.cpu() for ids in self.model.routing()]  # per MoE layer: [T, k]
        return [
            [ids[row].tolist() for ids in layers] if r.params.return_routed_experts else None
            for r, row in zip(reqs, token_rows, strict=True)
        ]

    # -- offline use ------------------------------------------------------------------------

    def score(self, prompts: Seq[Seq[int]], images: Seq | None = None) -> list[torch.Tensor]:
        """Logits [L, V] (fp32) at every position of each prompt, in one batch; keeps no state.

        images (VL): per prompt, its images (or None); L counts the expanded placeholders."""
        images = images if images is not None else [None] * len(prompts)
        made = [self._prompt(p, im) for p, im in zip(prompts, images, strict=True)]
        seqs = [Sequence(f"score-{i}", ids, max_tokens=0) for i, (ids, _) in enumerate(made)]
        mms = {s.seq_id: mm for s, (_, mm) in zip(seqs, made)}
        need = [self.scheduler.blocks_needed(s) for s in seqs]
        if not self.scheduler.blocks.can_allocate(sum(need)):
            raise RequestError("not enough free KV cache to score these prompts")
        for s, n in zip(seqs, need):
            s.block_table = self.scheduler.blocks.allocate(n)
        try:
            plan = [ScheduledSeq(s, len(s.token_ids)) for s in seqs]
            input_ids, meta = build_step(plan, self.cfg.block_size, self.device)
            meta.last_index = torch.arange(len(input_ids), device=self.device)
            mm = build_multimodal_step(plan, mms.get, self.model.encode_images, self.device)
            logits = self.model(input_ids, meta, self.kv, self.dispatcher, mm).cpu()  # [T, V]
        finally:
            for s in seqs:
                self.scheduler.blocks.release(s.block_table)
        return list(logits.split([len(s.token_ids) for s in seqs]))

    def generate(
        self,
        prompts: Seq[Seq[int]],
        params: SamplingParams | Seq[SamplingParams],
        images: Seq | None = None,
    ) -> list[Completion]:
        """Run prompts to completion in one continuous batch; results in prompt order.

        images (VL): per prompt, its images (or None)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        images = images if images is not None else [None] * len(prompts)
        done: dict[str, Completion] = {}
        for i, (prompt, p, im) in enumerate(zip(prompts, params, images, strict=True)):
            rid = f"generate-{i}"
            self.add_request(rid, prompt, p, im)
            done[rid] = Completion(rid, list(self.requests[rid].seq.token_ids))
        while any(c.finish_reason is None for c in done.values()):
            for ev in self.step():
                c = done[ev.request_id]
                c.token_ids.append(ev.token_id)
                c.logprobs.append(ev.logprob)
                if ev.top_logprobs is not None:
                    c.top_logprobs.append(ev.top_logprobs)
                c.finish_reason = ev.finish_reason
        return list(done.values())

    def close(self) -> None:
        self.dispatcher.close()
