"""Frontend processes (``--frontend-processes N``): HTTP and gRPC served by N processes
beside the router, which keeps scheduling, batching and the models.

DESIGN (issue 15): one router process spends ~150 us (HTTP) to ~220 us (gRPC) of its event
loop per small request, of which aiohttp/uvloop or grpc.aio alone take 70-124 us, so one
process cannot serve more than ~5k (HTTP) / ~4k (gRPC) small requests a second on the 16-core
device machine whatever Shoal's own code does. Measured first on the 2-core dev box with a
throwaway script (processes submitting BLS calls to a patched router): the router serves a
request that arrives already decoded, over its worker channel, for ~60 us of CPU
(12.7-15.7k requests/s) where it served 5.7k HTTP / 2.7k gRPC requests/s itself; then, built,
on the device machine (``FRONTENDS=4 bash scripts/device_bench``): 1.4-2.7x the router
alone on small requests at c=16/64 (README, Benchmarks). So each frontend process listens on the public ports
(SO_REUSEPORT: the kernel spreads connections over them), decodes inference requests with the
router's own codecs, and submits them over the worker channel as BLS calls are submitted
(``BlsCall``/``BlsReply``/``BlsDone``, with the fields a client request needs). gRPC
``ModelStreamInfer`` is served there too, by the router's own stream code: each streamed
request is a call the router answers for a model of either kind, with flow control (the
router sends at most ``calls.STREAM_WINDOW`` replies the frontend has not acknowledged) and
cancellation. Every other call (metadata, control, shared-memory registration, generate,
traced requests) it forwards unchanged to the router's own HTTP and gRPC servers on Unix
sockets in the run directory. The router starts, restarts and stops them.
"""
