-- Sign-ins in progress: bounded and pruned per tenant, with a consent step bound to the browser.
-- A row is created when the authorization request is valid (keyed by the hash of the consent
-- token the consent page and its cookie carry), and re-keyed by the hash of the state sent to the
-- IdP when the engineer allows it. Expired rows are pruned per tenant, through this index.
CREATE INDEX oauth_signins_expiry ON oauth_signins (tenant_id, expires_at);
CREATE INDEX oauth_signins_client ON oauth_signins (tenant_id, client_id);
-- SHA-256 of the cookie that binds the browser which allowed the sign-in (NULL while the consent
-- page is shown); the IdP's return is accepted only from that browser.
ALTER TABLE oauth_signins ADD COLUMN browser_hash TEXT;
