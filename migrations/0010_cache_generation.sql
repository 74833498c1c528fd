-- One counter that every change to what replicas cache (agent token revocation, environments and
-- their declared secret names, egress rules) increments in the change's own transaction. Each
-- replica re-reads it at most every 250 ms and drops its caches when it moved, so a revocation on
-- any replica is honoured by all of them within a second.
CREATE TABLE cache_generation (
    id         BIGINT PRIMARY KEY,
    generation BIGINT NOT NULL
);
INSERT INTO cache_generation (id, generation) VALUES (1, 0);
