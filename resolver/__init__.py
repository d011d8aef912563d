"""A DNS filtering resolver: blocks listed domains, forwards everything else."""
