"""Text in: where it comes from, the cache of its ids, its vocabulary, and how a run reads it.

    sources.py       CORPUS arguments: files, folders, globs, nltk:NAME[/FILEID]; strict decoding
    cache.py         the memory-mapped id cache, keyed by a hash of the sources
    checked.py       its ids, each block checked against its CRC-32 the first time it is read
    vocab.py         characters <-> ids through code points (the one way text becomes ids)
    streams.py       the corpus in the model's vocabulary, what is held out, the BPTT streams
    records.py       records (one per line, or paragraphs): finding them, holding some out
    record_batch.py  whole records packed into batch windows, each read from a fresh state

Imports: config and the leaves only (numpy and PyTorch tensors, never the model).
"""
