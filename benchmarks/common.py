"""What the benchmark scripts share: synthetic tokenizer and prompts, timing, peak memory, the naive
log-prob baseline. Imported as a sibling module (`python benchmarks/<script>.py` puts this folder first
on the import path); it imports nothing from `sail_min` but its public names."""
from __future__ import annotations

import ctypes
import os
import threading
import time

import torch
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = 0, 1, 2                   # special ids of the synthetic tokenizer and configs


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the model's vocabulary: token i is the word "t<i>"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK, **{f"t{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def make_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[str]:
    """n prompts of exactly `length` tokens (random ordinary words); the trailing space keeps a
    reward model's "prompt + response" text split at the boundary."""
    ids = torch.randint(3, vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))
    return [" ".join(f"t{i}" for i in row.tolist()) + " " for row in ids]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device):
    """(seconds, result) of fn()."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def naive_sequence_logprobs(model, input_ids, attention_mask, response_mask):
    """The textbook version: full [B, L, V] log_softmax in fp32 (as most DPO code does)."""
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    logprobs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).logits[:, :-1].float().log_softmax(dim=-1)   # [B, L-1, V]
    token_logprobs = logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logprobs * response_mask[:, 1:]).sum(dim=1)


def make_batch(batch, length, prompt_length, vocab, device, generator):
    """Prompts left-padded, responses right-padded, lengths varying per row."""
    input_ids = torch.randint(vocab, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    response_mask = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        left_pad = int(torch.randint(prompt_length // 2, (1,), generator=generator))
        right_pad = int(torch.randint((length - prompt_length) // 4, (1,), generator=generator))
        attention_mask[row, :left_pad] = 0
        if right_pad:
            attention_mask[row, length - right_pad:] = 0
        response_mask[row, prompt_length:length - right_pad] = 1
    return input_ids.to(device), attention_mask.to(device), response_mask.to(device)


class PeakRSS:
    """Peak resident set size above the starting one, sampled every `interval` seconds."""

    def __init__(self, interval=0.001):
        self.interval = interval
        self.page_bytes = os.sysconf("SC_PAGE_SIZE")

    def rss(self):
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page_bytes

    def __enter__(self):
        self.start = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())
        self.bytes = self.peak - self.start


def release_freed_memory():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: RSS may then include memory freed earlier
        pass


def random_texts(n: int, lengths: tuple[int, int], vocab_size: int, generator: torch.Generator) -> list[str]:
    """n texts of random ordinary words, each lengths[0]..lengths[1] tokens long; the trailing space
    keeps a judge's "prompt + response" text split at the boundary."""
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=generator).tolist()
    return [" ".join(f"t{i}" for i in torch.randint(3, vocab_size, (k,), generator=generator).tolist()) + " "
            for k in sizes]
