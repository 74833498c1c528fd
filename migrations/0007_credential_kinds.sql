-- Credential kinds: besides environment variables (the default), an environment's credentials can be
-- files, per-grant database roles or OAuth clients. The kind and its settings (never a secret) live
-- beside the declared names, as a JSON object name -> {"kind": ..., "settings": {...}}; names not in it
-- are environment variables. Values stay in `secrets`, sealed as before.
ALTER TABLE environments ADD COLUMN credentials TEXT NOT NULL DEFAULT '{}';
