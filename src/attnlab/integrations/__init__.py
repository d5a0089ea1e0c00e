"""attnlab under other libraries: adapters that route their attention through
:func:`attnlab.attention` and attnlab's masks, with no model code copied.

* :mod:`attnlab.integrations.transformers` (extra ``attnlab[hf]``): a Hugging Face
  transformers attention backend, ``attn_implementation="attnlab"``, and
  :mod:`~attnlab.integrations.hf_masks`, the translation of transformers' mask requests
  into attnlab masks.

Nothing here is imported by ``import attnlab``; what calls into a library (``register()``)
needs its extra, and says so.
"""
