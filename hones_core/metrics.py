"""Task metrics: VQA accuracy, ANLS, corpus BLEU-4 and NDCG@k with one relevant candidate.

`METRICS` names each metric (the key `tasks.TASKS[task].metric` holds) and says how it is
scored: a mean of per-item scores, or corpus BLEU-4 from summed n-gram statistics. The
functions that take a metric name (`statistics`, `from_statistics`, `aggregate`) read that
table; they know nothing about tasks.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# --- VQA (the VQAv2 evaluation script's answer processing) ------------------------------------
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "its": "it's",
    "lets": "let's", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "shant": "shan't", "shed": "she'd",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "somebodys": "somebody's",
    "someones": "someone's", "somethings": "something's", "thats": "that's", "thered": "there'd",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


@functools.lru_cache(maxsize=1 << 16)     # the same gold answers are normalised once per head plan
def normalize_vqa_answer(text: str) -> str:
    """VQAv2 answer normalisation: punctuation, number words -> digits, articles, contractions."""
    original = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = original
    for p in _PUNCTUATION:   # a mark next to a space (or a digit comma) is dropped, otherwise it splits
        if (p + " " in original or " " + p in original) or _COMMA_STRIP.search(original) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(#annotators who gave the prediction / 3, 1); exact match when there is one answer."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one gold answer")
    pred = normalize_vqa_answer(prediction)
    golds = [normalize_vqa_answer(a) for a in answers]
    if len(golds) == 1:
        return float(pred == golds[0])
    return min(sum(g == pred for g in golds) / 3.0, 1.0)


# --- ANLS ------------------------------------------------------------------------------------
def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Per-item ANLS (ST-VQA): max over answers of 1 - NL, 0 where NL >= threshold."""
    if not answers:
        raise ValueError("anls needs at least one gold answer")
    pred = prediction.strip().lower()
    best = 0.0
    for answer in answers:
        gold = answer.strip().lower()
        length = max(len(pred), len(gold))
        nl = levenshtein(pred, gold) / length if length else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


# --- BLEU --------------------------------------------------------------------------------------
def bleu_tokenize(text: str) -> list[str]:
    """Lowercased words (letters, digits, apostrophes); punctuation does not count."""
    return re.findall(r"[a-z0-9']+", text.lower())


@dataclass
class BleuStats:
    """Sufficient statistics of corpus BLEU: clipped matches and totals per n-gram order, lengths."""
    matches: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    totals: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    hyp_len: int = 0
    ref_len: int = 0

    def __add__(self, other: BleuStats) -> BleuStats:
        return BleuStats([a + b for a, b in zip(self.matches, other.matches)],
                         [a + b for a, b in zip(self.totals, other.totals)],
                         self.hyp_len + other.hyp_len, self.ref_len + other.ref_len)


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu_statistics(hypothesis: str, references: Sequence[str], max_n: int = 4) -> BleuStats:
    """Statistics of one hypothesis against its references (closest reference length, ties -> shorter)."""
    if not references:
        raise ValueError("BLEU needs at least one reference per hypothesis")
    hyp = bleu_tokenize(hypothesis)
    refs = [bleu_tokenize(r) for r in references]
    stats = BleuStats([0] * max_n, [0] * max_n, len(hyp),
                      min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1])
    for n in range(1, max_n + 1):
        counts = _ngrams(hyp, n)
        max_ref: Counter = Counter()
        for r in refs:
            max_ref |= _ngrams(r, n)
        stats.matches[n - 1] = sum(min(c, max_ref[g]) for g, c in counts.items())
        stats.totals[n - 1] = max(len(hyp) - n + 1, 0)
    return stats


def bleu_from_statistics(stats: BleuStats) -> float:
    """Corpus BLEU (uniform weights, brevity penalty, no smoothing: any zero precision -> 0)."""
    if stats.hyp_len == 0 or any(m == 0 for m in stats.matches):
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(stats.matches, stats.totals)) / len(stats.matches)
    brevity = 1.0 if stats.hyp_len > stats.ref_len else math.exp(1 - stats.ref_len / stats.hyp_len)
    return brevity * math.exp(log_precision)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Papineni corpus BLEU-4 over (hypothesis, its references) pairs."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference lists")
    total = BleuStats([0] * max_n, [0] * max_n)
    for hyp, refs in zip(hypotheses, references):
        total = total + bleu_statistics(hyp, refs, max_n)
    return bleu_from_statistics(total)


# --- NDCG --------------------------------------------------------------------------------------
def ndcg_at_k(scores: Sequence[float], positive: int, k: int = 5) -> float:
    """NDCG@k with one relevant candidate: 1/log2(rank + 1) if rank <= k else 0.

    Ties are broken pessimistically (equal scores rank above the positive), so a scorer that
    gives every candidate the same score gets no credit.
    """
    if not 0 <= positive < len(scores):
        raise ValueError(f"positive index {positive} is out of range for {len(scores)} candidates")
    if any(math.isnan(s) for s in scores):
        raise ValueError("retrieval scores contain NaN")
    target = scores[positive]
    rank = 1 + sum(1 for i, s in enumerate(scores) if i != positive and s >= target)
    return 1.0 / math.log2(rank + 1) if rank <= k else 0.0


@dataclass(frozen=True)
class Metric:
    """A task metric: its name, how people read it, and its per-item score (None: corpus BLEU-4)."""
    name: str
    title: str
    item_score: Callable | None


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("vqa_accuracy", "VQA accuracy", vqa_accuracy),
    Metric("anls", "ANLS", anls),
    Metric("bleu4", "BLEU-4", None),
    Metric("ndcg@5", "NDCG@5", ndcg_at_k),
)}


def _metric(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; metrics are {', '.join(METRICS)}")
    return METRICS[name]


def statistics(metric: str, predictions: Sequence, references: Sequence) -> list[float]:
    """Additive sufficient statistics of `metric` over some items.

    Statistics of disjoint parts of a split add up to those of the whole split, and
    `from_statistics` turns them into the metric: `[sum of per-item scores, items]` for the
    per-item metrics (VQA accuracy, ANLS, NDCG@5); for corpus BLEU-4 the clipped matches and
    totals per n-gram order and the hypothesis and reference lengths. This is how shards
    processed apart give exactly the metric of the whole split (BLEU is not a mean of parts).
    """
    score = _metric(metric).item_score
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if score is None:
        total = BleuStats()
        for hyp, refs in zip(predictions, references):
            total = total + bleu_statistics(hyp, refs)
        return [*map(float, total.matches), *map(float, total.totals), float(total.hyp_len), float(total.ref_len)]
    return [float(sum(score(p, r) for p, r in zip(predictions, references))), float(len(predictions))]


def statistics_size(metric: str) -> int:
    """Length of `statistics(metric, ...)`."""
    return 10 if _metric(metric).item_score is None else 2


def from_statistics(metric: str, stats: Sequence[float]) -> float:
    """The metric from (summed) `statistics`."""
    if len(stats) != statistics_size(metric):
        raise ValueError(f"{metric} statistics have {statistics_size(metric)} entries, got {len(stats)}")
    if _metric(metric).item_score is None:
        ints = [int(round(v)) for v in stats]
        return bleu_from_statistics(BleuStats(ints[0:4], ints[4:8], ints[8], ints[9]))
    if stats[1] <= 0:
        raise ValueError("no predictions to score")
    return stats[0] / stats[1]


def aggregate(metric: str, predictions: Sequence, references: Sequence) -> float:
    """`metric` over a split.

    Per-item metrics (vqa_accuracy, anls: predictions are strings, references answer lists;
    ndcg@5: candidate score lists vs the positive's index) are the mean over items; bleu4
    (strings vs reference lists) is corpus BLEU-4.
    """
    score = _metric(metric).item_score
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    if score is None:
        return corpus_bleu(predictions, references)
    return sum(score(p, r) for p, r in zip(predictions, references)) / len(predictions)
