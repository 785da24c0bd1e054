"""Coverage-guided fuzzing of blockws's parsers (atheris, libFuzzer).

    python -m benchmarks.fuzz --target protocol --seconds 60
    python -m benchmarks.fuzz --target all --runs 10000000
    python -m benchmarks.fuzz --target http2 --replay crash-1234...   # rerun one input
    python -m benchmarks.fuzz --target http2 --runs 5000000 --corpus-dir .fuzz/corpus
        # a long campaign in parts: each part starts from the corpus the last one left

Targets (``benchmarks/fuzz/targets.py`` says what each checks; the HTTP/2 one is in
``h2.py``): ``frames``
(the header parser, ``Frame.parse``, pure and C masking), ``protocol`` (the
streaming parser in every reporting mode, both roles, with and without
permessage-deflate, whole and cut into pieces), ``handshake`` (the HTTP/1.1
response reader and its validation), ``extensions`` (extension header
parsing and permessage-deflate negotiation), ``inflate`` (bounded
inflation) and ``http2`` (the HTTP/2 reader and its DATA fast path).

Each target runs in a child process under libFuzzer, with its seeds
(``targets.seeds``) as the starting corpus and an RSS limit
(``--rss-limit-mb``, 1024 by default). A crash (an exception that is not a
documented one, or a broken check) leaves the input in ``.fuzz/<target>/``
and makes the run fail; ``--replay FILE`` runs that input again with its
traceback. Without atheris (no wheel for the platform) the runner falls back
to random mutation of the seeds: not coverage-guided, and it says so.
"""
