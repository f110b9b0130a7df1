"""A subscriber written from docs/zmq-schema.md alone must work: run its snippet verbatim."""

import re
import threading

from conftest import ROOT
from inspector.config import parse_config
from inspector.pipeline import Pipeline


def test_doc_snippet_reads_a_live_stream(synthetic_cfg):
    doc = (ROOT / "docs" / "zmq-schema.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    cfg = parse_config(synthetic_cfg(source={"fps": 20}), "t.yaml")
    snippet = snippet.replace("tcp://127.0.0.1:5556", cfg.publish.endpoint)
    snippet = snippet.replace("print(", "result.append((").replace("m.shape)", "m.shape))")
    result: list = []
    t = threading.Thread(target=exec, args=(snippet, {"result": result}))
    t.start()
    with Pipeline(cfg) as p:
        p.run(frames=10)
    t.join(timeout=30)
    assert result and result[0][2] == (128, 512)
