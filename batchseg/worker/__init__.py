"""The worker side: a worker process's life (``process``), the engine contract (``contract``), the
one writer of outputs (``writer``), tiling (``tiling``) and the messages it exchanges with the pool
(``messages``). The parent imports ``contract`` and ``messages`` (torch-free) and starts
``process.worker_main``; nothing here imports the parent's machinery (``batchseg.supervise``)."""
