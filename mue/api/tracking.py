"""Per-example exit figures out of one batch that fairseq-generate's generator ran.

The task's generator (mue.generation.MueSequenceGenerator) opens one exit session per batch, times it,
and adds what ran to its ExitStats: batch totals. ``BatchObserver`` watches such a batch, without
changing what is computed:
  * it wraps the generator's ``exits_attached`` (used by beam search and by SNLI-VE's answer scoring)
    to keep the session's ExitTrace before the generator accounts and clears it, and the batch's time;
  * for beam search it hands the generator a fairseq ``EnsembleModel`` that also notes, at every
    decoder step, the example each beam row belongs to (beam search reorders rows and drops finished
    examples) and each row's tokens so far.
``example_exits`` then splits the trace by example (mue.exiting.trace.split_rows) and accounts each part
the way the generator accounts the batch (mue.exiting.accounting.account), so the examples' figures add up
to the batch's; the noted prefixes give the exit layer of every token of the returned hypothesis.
"""
import contextlib
from typing import Callable, Dict, List, Sequence

import torch
from fairseq.sequence_generator import EnsembleModel

from mue.exiting.accounting import account, new_stats
from mue.exiting.session import unwrap
from mue.exiting.trace import ExitTrace, split_rows

from .results import ExampleExits


class _ObservingEnsemble(EnsembleModel):
    """fairseq's EnsembleModel that reports, after each decoder step, each row's example and tokens."""

    def __init__(self, models, on_step: Callable):
        super().__init__(models)
        self.on_step = on_step
        self.rows = None  # row -> example of the batch

    def forward_encoder(self, net_input):
        self.rows = None
        return super().forward_encoder(net_input)

    def reorder_encoder_out(self, encoder_outs, new_order):
        # the first call repeats each example per beam; later ones follow the beams (and drop finished examples)
        self.rows = new_order.clone() if self.rows is None else self.rows.index_select(0, new_order)
        return super().reorder_encoder_out(encoder_outs, new_order)

    def forward_decoder(self, tokens, encoder_outs, incremental_states, temperature: float = 1.0):
        out = super().forward_decoder(tokens, encoder_outs, incremental_states, temperature)
        self.on_step(self.rows, tokens)
        return out


class BatchObserver:
    """Watch one generator call (``with observer.watching(beam_search): task.inference_step(...)``)."""

    def __init__(self, generator, model):
        self.generator = generator
        self.model = unwrap(model)
        self.trace = None  # the batch's ExitTrace, kept before the generator accounted it
        self.seconds = 0.0
        self.steps: List[tuple] = []  # beam search: (row -> example, tokens so far, cross records so far) per step

    @contextlib.contextmanager
    def watching(self, beam_search: bool):
        gen = self.generator
        ensemble = gen.model
        original = gen.exits_attached
        vars(gen)["exits_attached"] = self._attached(original)  # an instance attribute: the class stays fairseq's
        if beam_search:
            gen.model = _ObservingEnsemble(list(ensemble.models), self._on_step).eval()
        try:
            yield self
        finally:
            vars(gen).pop("exits_attached", None)
            gen.model = ensemble

    def _attached(self, original):
        @contextlib.contextmanager
        def attached():
            if self.trace is not None:
                raise RuntimeError("BatchObserver watches one batch: the generator opened a second exit session")
            before = self.generator.stats.wall_clock_s
            with original() as settings:
                yield settings
                trace = settings.trace
                self.trace = ExitTrace(list(trace.encoder), list(trace.decoder), list(trace.cross_kv))
            self.seconds += self.generator.stats.wall_clock_s - before

        return attached

    def _on_step(self, rows, tokens):
        trace = self.model.decoder.exit_settings.trace
        self.steps.append((rows.cpu(), tokens.cpu().clone(), len(trace.decoder), len(trace.cross_kv)))

    # ---- reading ---------------------------------------------------------------------------------
    def beam_search_owners(self, batch_size: int):
        """(encoder, decoder, cross_kv owners, kv weights) of the kept trace's records, for split_rows."""
        trace = self._kept()
        if len(self.steps) != len(trace.decoder) or any(s[2] != k + 1 for k, s in enumerate(self.steps)):
            raise RuntimeError("BatchObserver: the decoder steps and the trace's decoder records disagree")
        decoder = [rows for rows, *_ in self.steps]
        cross, step = [], 0
        for c, rec in enumerate(trace.cross_kv):  # each made during the first step whose count passed it
            while self.steps[step][3] <= c:
                step += 1
            rows = self.steps[step][0]
            cross.append(rows if rec.n_src.numel() == rows.numel() else torch.unique(rows))  # per row / per source
        return self._encoder_owners(batch_size), decoder, cross, None  # generation steps: split_rows' default

    def token_layers_of_hypotheses(self, hypos: Sequence[dict], batch_size: int) -> List[List[int]]:
        """The exit layer of every token of each example's returned hypothesis (a token is the output of
        the decoder step that saw the tokens before it)."""
        trace = self._kept()
        layers: Dict[tuple, int] = {}
        for (rows, tokens, _, _), rec in zip(self.steps, trace.decoder):
            for row, prefix, depth in zip(rows.tolist(), tokens.tolist(), rec.depths.cpu().tolist()):
                layers[(row, tuple(prefix))] = depth
        bos = int(self.steps[0][1][0, 0])
        out = []
        for i in range(batch_size):
            hypothesis = hypos[i][0]["tokens"].tolist()
            out.append([layers[(i, tuple([bos] + hypothesis[:j]))] for j in range(len(hypothesis))])
        return out

    def scoring_owners(self, batch_size: int, candidate_lengths: Sequence[int]):
        """Owners of answer scoring's records (mue.tasks.snli_ve.score_candidates: the encoder on the batch,
        the decoder teacher-forced on every (example, candidate) row, one record per position), and the kv
        weights: a teacher-forced layer fills the keys/values of a row's exited positions while another of its
        positions still runs, so a position's share is the row's deepest position minus its own depth."""
        trace = self._kept()
        k = len(candidate_lengths)
        cross = [torch.arange(rec.n_src.numel()) // (rec.n_src.numel() // batch_size) for rec in trace.cross_kv]
        rows = [self._scored_rows(rec, t, batch_size, candidate_lengths) for t, rec in enumerate(trace.decoder)]
        deepest = torch.zeros(batch_size * k, dtype=torch.long)
        for r, rec in zip(rows, trace.decoder):
            deepest[r] = torch.maximum(deepest[r], rec.depths.cpu())
        weights = [deepest[r] - rec.depths.cpu() for r, rec in zip(rows, trace.decoder)]
        return self._encoder_owners(batch_size), [r // k for r in rows], cross, weights

    def token_layers_of_answers(self, answers: Sequence[int], candidate_lengths: Sequence[int]) -> List[List[int]]:
        """The exit layer of every token of each example's chosen answer (``answers[i]``: its candidate)."""
        trace = self._kept()
        k = len(candidate_lengths)
        out = []
        for i, j in enumerate(answers):
            row, layers = i * k + j, []
            for t in range(candidate_lengths[j]):
                rows = self._scored_rows(trace.decoder[t], t, len(answers), candidate_lengths).tolist()
                layers.append(int(trace.decoder[t].depths[rows.index(row)]))
            out.append(layers)
        return out

    @staticmethod
    def _scored_rows(rec, t: int, batch_size: int, candidate_lengths: Sequence[int]) -> torch.Tensor:
        """The (example, candidate) rows a position's record holds: all of them, or (with exits) those whose
        candidate reaches position t."""
        k = len(candidate_lengths)
        rows = torch.arange(batch_size * k)
        if rec.depths.numel() == rows.numel():
            return rows
        return rows[torch.tensor([candidate_lengths[r % k] > t for r in rows.tolist()], dtype=torch.bool)]

    def _encoder_owners(self, batch_size: int):
        owners = []
        for rec in self._kept().encoder:
            if rec.image_depths.numel() != batch_size:
                raise RuntimeError(f"BatchObserver: an encoder record of {rec.image_depths.numel()} rows for a "
                                   f"batch of {batch_size}")
            owners.append(torch.arange(batch_size))
        return owners

    def _kept(self) -> ExitTrace:
        if self.trace is None:
            raise RuntimeError("BatchObserver: the generator opened no exit session")
        return self.trace

    def example_exits(self, owners, batch_size: int, token_layers: List[List[int]]) -> List[ExampleExits]:
        """Each example's ExampleExits from its share of the batch's trace."""
        gen = self.generator
        encoder, decoder, cross, kv_weights = owners
        parts = split_rows(self._kept(), encoder, decoder, cross, gen.sizes["n_dec"], kv_weights)
        out = []
        for i in range(batch_size):
            stats = account(new_stats(self.model, reference_sizes=gen.reference_sizes), parts[i], gen.sizes,
                            gen.reference_sizes)
            s = stats.summary()
            image = s["mean_image_layers"]
            out.append(ExampleExits(
                image_layers=None if image is None else int(round(image)),
                text_layers=int(round(s["mean_text_layers"])),
                encoder_layers=stats.n_enc_layers, decoder_layers=stats.n_dec_layers, token_layers=token_layers[i],
                mean_decoder_layers=s["mean_decoder_layers"], expected_time_reduction=s["expected_time_reduction"],
                flops=s["flops_spent"], flops_full=s["flops_full"], flops_by_component=s["flops_by_component"],
                seconds=self.seconds / batch_size))
        return out
