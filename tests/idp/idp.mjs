// A real OpenID Provider (npm `oidc-provider`, device flow enabled) for Custodian's tests.
//
// Started by the Rust test harness on a loopback port; prints one JSON line {"issuer": ...} when
// ready. Approval is driven by the tests over HTTP through the provider's own device pages and the
// interaction endpoints below (login, consent, abort), which call interactionDetails /
// interactionFinished exactly as a real login UI would.
//
// Knobs for the tests (environment):
//   CLIENTS        JSON array of client ids (public clients, device grant)       ["custodian"]
//   DEVICE_TTL     device code lifetime in seconds                                  600
//   INTERVAL       polling interval announced in device authorization responses      1
// and at run time, POST /test/mode {"mode": ...}:
//   "normal"       untouched provider responses
//   "slow_down"    the next token poll is answered `slow_down`, then back to normal
//   "wrong_aud"    ID tokens are re-signed (with the provider's key) for another audience
//   "garbage"      the token endpoint answers 200 with a body that is not JSON
//   "down"         every endpoint answers 503
// GET /test/polls lists the times (ms) of token requests seen; GET /test/issued every device code
// and token handed out.

import http from 'node:http';
import crypto from 'node:crypto';
import Provider from 'oidc-provider';
import * as jose from 'jose';

const clients = JSON.parse(process.env.CLIENTS || '["custodian"]');
const deviceTtl = Number(process.env.DEVICE_TTL || 600);
const interval = Number(process.env.INTERVAL || 1);

const accounts = {
  alice: { email: 'alice@example.com', groups: ['platform', 'developers'] },
  bob: { email: 'bob@example.com', groups: ['developers'] },
  mallory: { email: 'mallory@example.net', groups: [] },
};

const { privateKey } = await jose.generateKeyPair('RS256', { extractable: true });
const signingJwk = { ...(await jose.exportJWK(privateKey)), kid: 'test-key-1', alg: 'RS256', use: 'sig' };

let mode = 'normal';
const polls = [];
// Every device code and token this provider hands out, so tests can look for them where they must
// never appear (logs, database, tool results).
const issued = [];

const server = http.createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: clients.map((id) => ({
    client_id: id,
    token_endpoint_auth_method: 'none',
    // Custodian checks how recently the approver signed in; the IdP must say (OIDC auth_time).
    require_auth_time: true,
    grant_types: ['urn:ietf:params:oauth:grant-type:device_code'],
    response_types: [],
    redirect_uris: [],
  })),
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
  },
  scopes: ['openid', 'email', 'profile', 'groups'],
  claims: { openid: ['sub'], email: ['email', 'email_verified'], groups: ['groups'], profile: ['name'] },
  conformIdTokenClaims: false,
  ttl: { DeviceCode: deviceTtl, AccessToken: 600, IdToken: 600, Interaction: 600, Session: 600, Grant: 600 },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  findAccount: async (ctx, id) => {
    const account = accounts[id];
    if (!account) return undefined;
    return {
      accountId: id,
      claims: async () => ({ sub: id, email: account.email, email_verified: true, groups: account.groups, name: id }),
    };
  },
  pkce: { required: () => false },
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
  if (mode === 'down') {
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
  if (ctx.path === '/device/auth' && ctx.status === 200 && ctx.body) {
    ctx.body = { ...ctx.body, interval };
    issued.push(ctx.body.device_code);
  }
  if (ctx.path === '/token' && ctx.status === 200 && ctx.body) {
    for (const key of ['access_token', 'id_token', 'refresh_token']) {
      if (ctx.body[key]) issued.push(ctx.body[key]);
    }
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

process.stdout.write(`${JSON.stringify({ issuer, clients, nonce: crypto.randomUUID() })}\n`);
