"""One request, stage by stage: `handle` is the stage list (authenticate → parse → resolve →
admit → forward → relay → settle → record); each other module is one stage or what a stage
needs (the request context, the per-API differences, the upstream error mapping)."""
