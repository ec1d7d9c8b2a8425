"""``Tee``: the benchmarks print their tables and, with ``--markdown FILE``, also write them."""


class Tee:
    """Write to the console and to a file alike."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)

    def flush(self):
        for s in self.streams:
            s.flush()
