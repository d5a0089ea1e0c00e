"""What users run on real text: question answering and extractive summarization.

:func:`ask` answers a question from documents (text files, or Python's language
reference with ``"pydoc"``) with the sentence that answers it, in its context, and shows
which question words matched which passage words; :func:`summarize` picks a document's
most central sentences and gives each sentence's salience. Both run the pretrained
all-MiniLM-L6-v2 encoder on attnlab; nothing is downloaded (``pip install
'attnlab[pretrained,apps]'``). ``attnlab ask`` and ``attnlab summarize`` run them.

Example:
    >>> from attnlab.apps import summarize
    >>> s = summarize("Cats purr. Cats purr when content. Taxes rose in May.", sentences=1)
    >>> s.chosen, s.text  # needs attnlab[pretrained,apps]
    ([0], 'Cats purr.')
"""

from __future__ import annotations

from attnlab.apps.ask import Answer, Asker, Weights, ask
from attnlab.apps.corpus import Document, Sentence, split_document
from attnlab.apps.documents import load_documents
from attnlab.apps.index import Index, build_index, default_cache, load_index
from attnlab.apps.match import WordMatch, match_words
from attnlab.apps.summarize import Summary, summarize

__all__ = [
    "Answer",
    "Asker",
    "Document",
    "Index",
    "Sentence",
    "Summary",
    "Weights",
    "WordMatch",
    "ask",
    "build_index",
    "default_cache",
    "load_documents",
    "load_index",
    "match_words",
    "split_document",
    "summarize",
]
