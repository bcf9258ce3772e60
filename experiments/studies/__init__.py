"""Studies beyond the paper: each module has `run(quick, workdir) -> dict`, `figure(results, path)`
and `markdown(results) -> str`, for the reproduction's report."""
