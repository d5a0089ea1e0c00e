"""Question answering and summarization over Python's language reference (issue 20).

All in one process, anchors beside attnlab:

* ``index``: building the sentence index of the whole reference (``pydoc_data.topics``)
  from nothing with attnlab, beside sentence-transformers encoding the same sentences;
  the peak resident memory the build added (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before, minus ``VmRSS`` then); the files' size; and the
  incremental rebuild after one document changed (how many sentences it re-embedded, its
  time).
* ``search``: the index's brute-force exact search beside faiss' ``IndexFlatIP`` and
  ``IndexHNSWFlat`` (M=32) on the same vectors: ms per query, and HNSW's recall@5.
* ``ask``: top-1 / top-5 accuracy and milliseconds per question on the question set that
  ships in ``attnlab/apps/data/questions.jsonl``, for attnlab's pipeline (hybrid ranking
  + token re-ranking), BM25 (rank-bm25's ``BM25Okapi`` on the same sentences and words)
  and plain cosine retrieval with sentence-transformers and the same MiniLM model; each
  question runs all three in turn. Each method's top 5 holds 5 different texts: a
  sentence repeated in several topics (807 of the reference's 3,602 are repeats) counts
  once, at its best rank, as attnlab's ranking does. One line per split: ``all``,
  ``dev`` (the half the weights were chosen on) and ``test`` (never tuned on). A hit is
  a retrieved sentence whose text is one of the question's answer sentences.
* ``summarize``: ROUGE-1/2/L F1 (rouge-score, stemmed) against the reference summaries in
  ``attnlab/apps/data/summaries.jsonl``, for ``attnlab.apps.summarize`` and sumy's
  LexRank and TextRank, each picking the same number of sentences from the same split
  sentences (sumy gets them pre-split with attnlab's word tokenizer and its own Snowball
  stemmer, so no NLTK data is needed); seconds per document. Rows for ``all`` and for
  the ``dev`` half (attnlab's ``position`` prior was chosen there) and the ``test`` half.

python benchmarks/bench_ask.py            # the whole reference, every question
python benchmarks/bench_ask.py --smoke    # 6 topics, their questions, 3 summaries (CI)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from importlib.resources import files
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from attnlab.apps import Asker, Document, build_index, load_documents, summarize
from attnlab.apps.corpus import split_document
from attnlab.apps.lexical import words
from attnlab.cli._args import script_parser
from attnlab.models import SentenceEncoder, minilm_path

SUMMARY_SENTENCES = 2
SMOKE_TOPICS = ("assert", "break", "nonlocal", "pass", "return", "with")


def data(name: str) -> list[dict[str, Any]]:
    text = files("attnlab.apps").joinpath("data", name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def status_mb(field: str) -> float:
    """A field of Linux ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_mb() -> float:
    """Reset the resident set's high-water mark (``VmHWM``) to the current resident set
    through ``/proc/self/clear_refs`` and return that size: ``ru_maxrss`` cannot be reset,
    and loading the models has already set it above what the build reaches."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_mb("VmRSS")


def emit(**row: Any) -> None:
    """One JSON line, naming the CPU its times were measured on."""
    print(json.dumps({**row, "cpu": torch.backends.cpu.get_cpu_capability()}), flush=True)


def bench_index(docs: list[Document], enc: SentenceEncoder, anchor: Any, folder: Path) -> Any:
    """Full build beside sentence-transformers, then one changed document."""
    before = reset_peak_mb()
    t0 = time.perf_counter()
    index = build_index(docs, enc, folder)
    t_build = time.perf_counter() - t0
    grew = status_mb("VmHWM") - before
    texts = [s.text for s in index.sentences]
    t0 = time.perf_counter()
    st_vecs = anchor.encode(
        texts, batch_size=256, convert_to_tensor=True, normalize_embeddings=True
    )
    t_st = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in folder.iterdir())
    changed = [*docs[:-1], Document(docs[-1].name, docs[-1].text + "\n\nOne more sentence.\n")]
    t0 = time.perf_counter()
    again = build_index(changed, enc, folder)
    t_inc = time.perf_counter() - t0
    emit(
        bench="index",
        documents=len(docs),
        sentences=len(texts),
        attnlab_s=round(t_build, 2),
        sentence_transformers_s=round(t_st, 2),
        ratio=round(t_st / t_build, 2),
        peak_rss_added_mb=round(grew, 1),
        files_mb=round(size / 2**20, 2),
        incremental_s=round(t_inc, 2),
        incremental_embedded=again.embedded,
    )
    return index, st_vecs


def bench_search(index: Any, enc: SentenceEncoder, repeat: int = 5) -> None:
    """Brute-force search (what attnlab does) beside faiss' exact flat and HNSW indexes:
    ms per query at the corpus' size and HNSW's recall of the exact top 5."""
    try:
        import faiss
    except ImportError:
        emit(bench="search", skipped="faiss-cpu is not installed (pip install 'attnlab[dev]')")
        return
    queries = enc.encode([q["question"] for q in data("questions.jsonl")])  # (Q, D)
    x = index.vectors.numpy()
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    hnsw = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    hnsw.add(x)
    t_hnsw_build = time.perf_counter() - t0
    runs = {
        "brute": lambda q: index.search(q[None], 5)[1][0],
        "faiss_flat": lambda q: flat.search(q[None].numpy(), 5)[1][0],
        "faiss_hnsw": lambda q: hnsw.search(q[None].numpy(), 5)[1][0],
    }
    best = dict.fromkeys(runs, float("inf"))
    found: dict[str, list[set[int]]] = {}
    for _ in range(repeat):  # alternate, keep each one's best round
        for name, fn in runs.items():
            t0 = time.perf_counter()
            found[name] = [{int(i) for i in fn(q)} for q in queries]
            best[name] = min(best[name], time.perf_counter() - t0)
    recall = sum(len(a & b) for a, b in zip(found["faiss_hnsw"], found["brute"], strict=True))
    emit(
        bench="search",
        vectors=len(x),
        queries=len(queries),
        **{f"{k}_ms": round(1000 * v / len(queries), 4) for k, v in best.items()},
        faiss_hnsw_build_s=round(t_hnsw_build, 3),
        faiss_hnsw_recall5=round(recall / (5 * len(queries)), 4),
    )


def distinct_top(scores: torch.Tensor, texts: list[str], k: int = 5) -> list[int]:
    """The ``k`` best rows by ``scores (N,)`` whose texts differ, best first: a text that
    stands in several documents counts once, at its best, as in attnlab's own ranking
    (the baselines' top 5 held repeats, which attnlab's did not)."""
    seen: set[str] = set()
    rows: list[int] = []
    for i in scores.argsort(descending=True).tolist():
        if texts[i] not in seen:
            seen.add(texts[i])
            rows.append(i)
            if len(rows) == k:
                break
    return rows


def bench_ask(index: Any, enc: SentenceEncoder, anchor: Any, st_vecs: torch.Tensor) -> None:
    """Top-1/top-5 and ms per question for attnlab, BM25 and plain cosine, interleaved."""
    from rank_bm25 import BM25Okapi

    topics = set(index.digests)
    questions = [q for q in data("questions.jsonl") if q["topic"] in topics]
    texts = [" ".join(s.text.split()) for s in index.sentences]
    asker = Asker(index, enc)
    bm25 = BM25Okapi([words(t) or ["_"] for t in texts])
    asker.rank(questions[0]["question"])  # warm-up
    hits: dict[str, list[tuple[bool, bool, str]]] = {"attnlab": [], "bm25": [], "cosine": []}
    secs = dict.fromkeys(hits, 0.0)

    def record(name: str, rows: list[int], gold: set[str], split: str, t: float) -> None:
        ok = [texts[i] in gold for i in rows[:5]]
        hits[name].append((ok[0], any(ok), split))
        secs[name] += t

    for q in questions:
        gold = {" ".join(a.split()) for a in q["answers"]}
        t0 = time.perf_counter()
        ranked = asker.rank(q["question"], 5)
        t1 = time.perf_counter()
        where = {id(s): i for i, s in enumerate(index.sentences)}
        record("attnlab", [where[id(a.sentence)] for a in ranked], gold, q["split"], t1 - t0)
        t0 = time.perf_counter()
        rows = distinct_top(torch.tensor(bm25.get_scores(words(q["question"]))), texts)
        record("bm25", rows, gold, q["split"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        v = anchor.encode([q["question"]], convert_to_tensor=True, normalize_embeddings=True)
        rows = distinct_top(st_vecs @ v[0], texts)
        record("cosine", rows, gold, q["split"], time.perf_counter() - t0)
    for split in ("all", "dev", "test"):
        row: dict[str, Any] = {"bench": "ask", "split": split}
        for name, hs in hits.items():
            sel = [h for h in hs if split in ("all", h[2])]
            row["questions"] = len(sel)
            row[f"{name}_top1"] = round(sum(h[0] for h in sel) / max(len(sel), 1), 3)
            row[f"{name}_top5"] = round(sum(h[1] for h in sel) / max(len(sel), 1), 3)
            if split == "all":
                row[f"{name}_ms"] = round(1000 * secs[name] / max(len(hs), 1), 1)
        emit(**row)


class _Words:
    """sumy's tokenizer protocol with attnlab's word splitter (no NLTK data needed)."""

    language = "english"

    def to_words(self, text: str) -> list[str]:
        return words(text)


def _sumy(kind: str, sentences: list[str], n: int) -> list[str]:
    from sumy.models.dom import ObjectDocumentModel, Paragraph, Sentence
    from sumy.nlp.stemmers import Stemmer
    from sumy.summarizers.lex_rank import LexRankSummarizer
    from sumy.summarizers.text_rank import TextRankSummarizer

    tok = _Words()
    doc = ObjectDocumentModel([Paragraph([Sentence(s, tok) for s in sentences])])
    cls = LexRankSummarizer if kind == "lexrank" else TextRankSummarizer
    return [str(s) for s in cls(Stemmer("english"))(doc, n)]


def bench_summarize(docs: dict[str, Document], enc: SentenceEncoder, limit: int | None) -> None:
    """ROUGE F1 of attnlab, LexRank and TextRank against the reference summaries."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    refs = [r for r in data("summaries.jsonl") if r["topic"] in docs][:limit]
    totals: dict[tuple[str, str], dict[str, float]] = {}
    for ref in refs:
        doc = docs[ref["topic"]]
        sents = [s.text for s in split_document(doc)]
        for name in ("attnlab", "lexrank", "textrank"):
            t0 = time.perf_counter()
            if name == "attnlab":
                text = summarize(doc, SUMMARY_SENTENCES, encoder=enc).text
            else:
                text = " ".join(_sumy(name, sents, SUMMARY_SENTENCES))
            t = time.perf_counter() - t0
            score = scorer.score(ref["summary"], text)
            for split in ("all", ref["split"]):
                zero = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "s": 0.0, "n": 0.0}
                tot = totals.setdefault((split, name), zero)
                for k in ("rouge1", "rouge2", "rougeL"):
                    tot[k] += score[k].fmeasure
                tot["s"] += t
                tot["n"] += 1
    for (split, name), tot in sorted(totals.items()):
        n = tot.pop("n")
        emit(
            bench="summarize",
            split=split,
            method=name,
            documents=int(n),
            sentences=SUMMARY_SENTENCES,
            **{k: round(v / n, 4) for k, v in tot.items() if k != "s"},
            s_per_doc=round(tot["s"] / n, 3),
        )


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--smoke", action="store_true", help="6 topics, for CI")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*truncated")
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    emit(bench="info", threads=torch.get_num_threads())
    enc = SentenceEncoder.from_pretrained()
    anchor = SentenceTransformer(str(minilm_path()), device="cpu")
    docs = load_documents("pydoc")
    if args.smoke:
        docs = [d for d in docs if d.name in SMOKE_TOPICS]
    with tempfile.TemporaryDirectory() as tmp:
        index, st_vecs = bench_index(docs, enc, anchor, Path(tmp))
    bench_search(index, enc)
    bench_ask(index, enc, anchor, st_vecs)
    bench_summarize({d.name: d for d in docs}, enc, 3 if args.smoke else None)


if __name__ == "__main__":
    main()
