"""Tool calls over HTTP: the request's tools checked (`request`), shown to the model
(`rendering`), the model's calls found in its text as it streams (`stream`, `json_scan`) in
the format its family writes (`formats`), and forced calls or response formats turned into a
constraint for the engine (`constraints`). See docs/tools.md.
"""
