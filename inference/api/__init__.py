"""The HTTP API of ``inference serve``: OpenAI's files and batches endpoints, native enqueue,
health and metrics. A thin layer over the Controller and WorkQueue actors.

Modules: :mod:`.app` (the FastAPI app factory), :mod:`.server` (``inference serve``); routes by
area: :mod:`.openai_batches`, :mod:`.files`, :mod:`.native`, :mod:`.ops`; :mod:`.models` (strict
request models), :mod:`.views` (records as OpenAI objects), :mod:`.items` (one item checked the
way file input is), :mod:`.batch_input` (an uploaded batch file checked as OpenAI does),
:mod:`.coalesce` (group commit of concurrent enqueues), :mod:`.state` (what routes share),
:mod:`.filestore` (uploaded and produced files), :mod:`.http_errors` (OpenAI's error shape),
:mod:`.guard` (bearer tokens, body limit). Importing this package does not import FastAPI: the
Controller uses the file store and the checks.
"""
