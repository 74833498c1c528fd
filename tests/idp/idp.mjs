// A real OpenID Provider (npm `oidc-provider`, device flow enabled) for Custodian's tests.
//
// The provider runs in oidc-provider's DEFAULT claim behaviour: no `require_auth_time`, no
// `conformIdTokenClaims` override, nothing more lenient than Keycloak, Okta, Entra ID or Google.
// Consequences the gateway must cope with, as it must with those providers:
// - `auth_time` is in the ID token only when the client asks for it (`max_age`);
// - the device flow always issues an access token, so scope claims (`email`, `email_verified`,
//   `groups`, `name`) are served ONLY by the userinfo endpoint; the ID token carries `sub` and the
//   authentication claims. `GET /test/id_tokens` lets tests prove it.
//
// Started by the Rust test harness on a loopback port; prints one JSON line {"issuer": ...} when
// ready. Approval is driven by the tests over HTTP through the provider's own device pages and the
// interaction endpoints below (login, consent, abort), which call interactionDetails /
// interactionResult exactly as a real login UI would.
//
// Knobs for the tests (environment):
//   CLIENTS        JSON array of client ids (public clients, device grant)       ["custodian"]
//   DEVICE_TTL     device code lifetime in seconds                                  600
//   INTERVAL       polling interval announced in device authorization responses      1
//   SIGNIN_REDIRECT_URIS  JSON array: when set, every client may also use the authorization-code
//                  flow (PKCE, as oidc-provider requires of public clients) with exactly these
//                  redirect URIs (Custodian's sign-in callbacks)                   unset
//   SERVICE_SECRET secret of the confidential client `svc-reporter` (client_credentials grant,
//                  scope `reports:read`)                                             random
//   INTROSPECTOR_SECRET  secret of the confidential client `introspector`, which tests use to
//                  introspect tokens (POST /token/introspection)                     random
// Besides CLIENTS, the public client `offline-cli` may use the device flow with `offline_access`
// and the refresh_token grant (oidc-provider's default rotation: a public client's refresh token
// is rotated at every use, and reusing a rotated-away one revokes the grant).
// and at run time, POST /test/mode {"mode": ...}: faults of a broken or hostile provider,
//   "normal"              untouched provider responses
//   "slow_down"           the next token poll is answered `slow_down`, then back to normal
//   "wrong_aud"           ID tokens are re-signed (with the provider's key) for another audience
//   "garbage"             the token endpoint answers 200 with a body that is not JSON
//   "down"                every endpoint answers 503
//   "userinfo_other_sub"  userinfo answers with another subject's claims than the ID token's
//   "userinfo_down"       the userinfo endpoint answers 503
//   "javascript_link"     device authorizations carry verification_uri_complete `javascript:…`
//   "http_link"           device authorizations carry a plain-http link to a non-loopback host
//   "no_device_endpoint"  discovery announces no device_authorization_endpoint
// GET /test/polls lists the times (ms) of token requests seen; GET /test/issued every device code
// and token handed out; GET /test/id_tokens the decoded claims of every ID token issued;
// GET /test/device_requests the client_id, scope and max_age of every device authorization request.

import http from 'node:http';
import crypto from 'node:crypto';
import Provider from 'oidc-provider';
import * as jose from 'jose';

const clients = JSON.parse(process.env.CLIENTS || '["custodian"]');
const deviceTtl = Number(process.env.DEVICE_TTL || 600);
const interval = Number(process.env.INTERVAL || 1);
const signinRedirects = JSON.parse(process.env.SIGNIN_REDIRECT_URIS || '[]');

// `email_verified` is part of each account's claims as a real directory would hold it: eve has
// put alice's address on her own profile (unverified, as Entra ID allows); trent's directory says
// nothing about verification at all.
const accounts = {
  alice: { email: 'alice@example.com', email_verified: true, groups: ['platform', 'developers'] },
  bob: { email: 'bob@example.com', email_verified: true, groups: ['developers'] },
  mallory: { email: 'mallory@example.net', email_verified: true, groups: [] },
  eve: { email: 'alice@example.com', email_verified: false, groups: [] },
  trent: { email: 'trent@example.com', groups: [] },
};

const { privateKey } = await jose.generateKeyPair('RS256', { extractable: true });
const signingJwk = { ...(await jose.exportJWK(privateKey)), kid: 'test-key-1', alg: 'RS256', use: 'sig' };

let mode = 'normal';
const polls = [];
// Every device code and token this provider hands out, so tests can look for them where they must
// never appear (logs, database, tool results).
const issued = [];
const idTokens = [];
const deviceRequests = [];

const server = http.createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

const serviceSecret = process.env.SERVICE_SECRET || crypto.randomBytes(24).toString('hex');
const introspectorSecret = process.env.INTROSPECTOR_SECRET || crypto.randomBytes(24).toString('hex');

const provider = new Provider(issuer, {
  clients: [
    ...clients.map((id) => ({
      client_id: id,
      token_endpoint_auth_method: 'none',
      grant_types: ['urn:ietf:params:oauth:grant-type:device_code']
        .concat(signinRedirects.length ? ['authorization_code'] : []),
      response_types: signinRedirects.length ? ['code'] : [],
      redirect_uris: signinRedirects,
    })),
    {
      client_id: 'offline-cli',
      token_endpoint_auth_method: 'none',
      grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
      response_types: [],
      redirect_uris: [],
    },
    {
      client_id: 'svc-reporter',
      client_secret: serviceSecret,
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: ['client_credentials'],
      scope: 'reports:read',
      response_types: [],
      redirect_uris: [],
    },
    {
      client_id: 'introspector',
      client_secret: introspectorSecret,
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: [],
      response_types: [],
      redirect_uris: [],
    },
  ],
  scopes: ['openid', 'offline_access', 'reports:read'],
  jwks: { keys: [signingJwk] },
  features: {
    deviceFlow: {
      enabled: true,
      userCodeInputSource: async (ctx, form) => {
        ctx.body = `<!DOCTYPE html><html><body>${form}</body></html>`;
      },
      userCodeConfirmSource: async (ctx, form) => {
        ctx.body = `<!DOCTYPE html><html><body>${form}</body></html>`;
      },
      successSource: async (ctx) => {
        ctx.body = '<!DOCTYPE html><html><body>device-flow-success</body></html>';
      },
    },
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
  },
  // The claims this directory holds, by scope (oidc-provider's way of declaring them).
  claims: { email: ['email', 'email_verified'], groups: ['groups'], profile: ['name'] },
  ttl: { DeviceCode: deviceTtl, AccessToken: 600, IdToken: 600, Interaction: 600, Session: 600, Grant: 600 },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  findAccount: async (ctx, id) => {
    const account = accounts[id];
    if (!account) return undefined;
    return {
      accountId: id,
      claims: async () => ({ sub: id, name: id, ...account }),
    };
  },
});

async function readJson(req) {
  let body = '';
  for await (const chunk of req) body += chunk;
  return body ? JSON.parse(body) : {};
}

function send(res, status, value) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(value));
}

// Rewrites and faults applied around the provider's own responses.
provider.use(async (ctx, next) => {
  if (mode === 'down' || (mode === 'userinfo_down' && ctx.path === '/me')) {
    ctx.status = 503;
    ctx.body = 'down for maintenance';
    return;
  }
  if (ctx.path === '/token') {
    polls.push(Date.now());
    if (mode === 'slow_down') {
      mode = 'normal';
      ctx.status = 400;
      ctx.body = { error: 'slow_down', error_description: 'polling too fast' };
      return;
    }
    if (mode === 'garbage') {
      ctx.status = 200;
      ctx.type = 'application/json';
      ctx.body = '{"id_token": <not json>';
      return;
    }
  }
  await next();
  if (ctx.path === '/.well-known/openid-configuration' && mode === 'no_device_endpoint') {
    const { device_authorization_endpoint: _, ...rest } = ctx.body;
    ctx.body = rest;
  }
  if (ctx.path === '/device/auth') {
    const params = ctx.oidc?.params ?? {};
    deviceRequests.push({
      client_id: params.client_id ?? null,
      scope: params.scope ?? null,
      max_age: params.max_age ?? null,
      status: ctx.status,
    });
  }
  if (ctx.path === '/device/auth' && ctx.status === 200 && ctx.body) {
    ctx.body = { ...ctx.body, interval };
    issued.push(ctx.body.device_code);
    if (mode === 'javascript_link') {
      ctx.body = { ...ctx.body, verification_uri_complete: 'javascript:alert(document.domain)' };
    }
    if (mode === 'http_link') {
      ctx.body = {
        ...ctx.body,
        verification_uri: 'http://idp.example.com/device',
        verification_uri_complete: `http://idp.example.com/device?user_code=${ctx.body.user_code}`,
      };
    }
  }
  if (ctx.path === '/token' && ctx.status === 200 && ctx.body) {
    for (const key of ['access_token', 'id_token', 'refresh_token']) {
      if (ctx.body[key]) issued.push(ctx.body[key]);
    }
    if (ctx.body.id_token) idTokens.push(jose.decodeJwt(ctx.body.id_token));
  }
  if (ctx.path === '/me' && ctx.status === 200 && ctx.body && mode === 'userinfo_other_sub') {
    ctx.body = { ...ctx.body, sub: 'mallory', email: 'mallory@example.net', groups: ['platform'] };
  }
  if (ctx.path === '/token' && ctx.status === 200 && ctx.body?.id_token && mode === 'wrong_aud') {
    const claims = jose.decodeJwt(ctx.body.id_token);
    claims.aud = 'some-other-client';
    ctx.body = {
      ...ctx.body,
      id_token: await new jose.SignJWT(claims)
        .setProtectedHeader({ alg: 'RS256', kid: signingJwk.kid })
        .sign(privateKey),
    };
  }
});

const callback = provider.callback();
server.on('request', async (req, res) => {
  try {
    const url = new URL(req.url, issuer);
    const match = url.pathname.match(/^\/interaction\/([^/]+)(?:\/(login|consent|abort))?$/);
    if (url.pathname === '/test/mode' && req.method === 'POST') {
      mode = (await readJson(req)).mode;
      return send(res, 200, { mode });
    }
    if (url.pathname === '/test/polls') {
      return send(res, 200, polls);
    }
    if (url.pathname === '/test/issued') {
      return send(res, 200, issued);
    }
    if (url.pathname === '/test/id_tokens') {
      return send(res, 200, idTokens);
    }
    if (url.pathname === '/test/device_requests') {
      return send(res, 200, deviceRequests);
    }
    if (match && mode !== 'down') {
      const details = await provider.interactionDetails(req, res);
      const action = match[2];
      if (!action) {
        return send(res, 200, { uid: details.uid, prompt: details.prompt.name, params: details.params });
      }
      let result;
      if (action === 'login') {
        const body = await readJson(req);
        const ts = Math.floor(Date.now() / 1000) - Number(body.auth_age_seconds || 0);
        result = { login: { accountId: body.account, ts, acr: body.acr, amr: body.amr } };
      } else if (action === 'consent') {
        const grant = new provider.Grant({ accountId: details.session.accountId, clientId: details.params.client_id });
        grant.addOIDCScope(details.params.scope);
        result = { consent: { grantId: await grant.save() } };
      } else {
        result = { error: 'access_denied', error_description: 'the approver declined' };
      }
      const redirectTo = await provider.interactionResult(req, res, result, { mergeWithLastSubmission: action !== 'login' });
      return send(res, 200, { redirectTo });
    }
  } catch (err) {
    return send(res, 500, { error: String(err) });
  }
  return callback(req, res);
});

// The harness reads the banner and closes the pipe: later notices of the provider go nowhere.
process.stdout.on('error', () => {});
process.stdout.write(`${JSON.stringify({ issuer, clients, nonce: crypto.randomUUID() })}\n`);
