"""What the speed benchmarks share: ``Tee`` (print the tables and, with ``--markdown FILE``, also
write them) and ``cpu_name`` (the processor the tables were measured on)."""

import platform


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


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), e.g. ``AMD EPYC``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"
