import fp from 'fastify-plugin'
import type {} from '../auth/plugin.js'
import * as client from 'openid-client'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { SESSION_COOKIE, SESSION_COOKIE_OPTIONS } from './cookies.js'
import { createLoginStateSeal } from './login-state.js'
import { createWebOidc, type WebOidc } from './oidc.js'
import { createReplayGuard } from './replay-guard.js'
import { createLogoutTokenVerifier } from './backchannel.js'
import { webRoutes } from './routes.js'
import { isFetchableUrl } from '../auth/key-set.js'

/**
 * Web sign-in (issue 4): `/auth/login`, `/auth/callback`, `/auth/backchannel-logout` when the web
 * client is configured, and the web side of `POST /auth/logout` in every case.
 */

export interface WebSignIn {
  /**
   * The web side of sign-out, after the session is revoked: clears the session cookie when that
   * is how the session came, and gives the IdP's end-session URL for a web session when the IdP
   * has one (null otherwise, and when the IdP cannot be reached: sign-out here never fails on it).
   */
  signOut: (request: FastifyRequest, reply: FastifyReply) => Promise<string | null>
  /**
   * Sign-out with a session cookie whose session has ended already (idle, absolute, another
   * replica's logout): clears the cookie, and gives the IdP's end-session URL (without an ID
   * token hint) when there is a web client and the IdP has one.
   */
  signOutEnded: (reply: FastifyReply) => Promise<string | null>
}

declare module 'fastify' {
  interface FastifyInstance {
    webSignIn: WebSignIn
  }
}

export interface WebSignInOptions {
  now?: () => number
}

async function endSessionUrl (oidc: WebOidc, idToken: string | null): Promise<string | null> {
  try {
    return endSessionUrlOf(await oidc.configuration(), oidc, idToken)
  } catch {
    return null
  }
}

/**
 * The IdP's end-session URL for a web sign-out, or null: none published, or one the browser must
 * not be sent to with the ID token. As the mobile sign-out (key-set.ts), only an https endpoint or
 * plain http on loopback; anything openid-client will not build gives none too, rather than an
 * error out of a sign-out.
 */
export function endSessionUrlOf (configuration: client.Configuration, oidc: Pick<WebOidc, 'clientId' | 'postLogoutRedirectUri'>, idToken: string | null): string | null {
  if (!isFetchableUrl(configuration.serverMetadata().end_session_endpoint)) return null
  try {
    return client.buildEndSessionUrl(configuration, {
      client_id: oidc.clientId,
      post_logout_redirect_uri: oidc.postLogoutRedirectUri,
      ...(idToken === null ? {} : { id_token_hint: idToken })
    }).href
  } catch {
    return null
  }
}

async function webSignIn (app: FastifyInstance, options: WebSignInOptions): Promise<void> {
  const { config } = app
  const web = config.oidc.web
  const oidc = web === null
    ? null
    : createWebOidc({ issuer: config.oidc.issuer, clientId: web.clientId, clientSecret: web.clientSecret, publicUrl: web.publicUrl, webAppUrl: web.webAppUrl })

  app.decorate('webSignIn', {
    async signOut (request: FastifyRequest, reply: FastifyReply): Promise<string | null> {
      if (request.sessionTransport === 'cookie') reply.clearCookie(SESSION_COOKIE, SESSION_COOKIE_OPTIONS)
      const session = request.session
      if (oidc === null || session === null || session.method !== 'web') return null
      return await endSessionUrl(oidc, session.idToken)
    },
    async signOutEnded (reply: FastifyReply): Promise<string | null> {
      reply.clearCookie(SESSION_COOKIE, SESSION_COOKIE_OPTIONS)
      if (oidc === null) return null
      // From a discovery made already: a request without a session never waits on the IdP. A
      // replica that has made none starts it, for the next one.
      const configuration = oidc.discovered()
      if (configuration === null) {
        oidc.configuration().catch(() => {})
        return null
      }
      return endSessionUrlOf(configuration, oidc, null)
    }
  })

  // Without a web client the routes do not exist: 404 NOT_FOUND, like any unknown path.
  if (web === null || oidc === null) return
  // The key set the mobile ID tokens are checked with: the same IdP keys, one cache and cooldown.
  const verifyLogoutToken = createLogoutTokenVerifier({
    keys: app.issuerKeys,
    audiences: [...new Set([web.clientId, ...config.oidc.audiences])],
    replayGuard: createReplayGuard(app.sharedState, options.now),
    ...(options.now === undefined ? {} : { now: options.now })
  })
  await app.register(webRoutes, {
    oidc,
    seal: createLoginStateSeal(config.keyRoot.secret, options.now),
    webAppUrl: web.webAppUrl,
    verifyLogoutToken
  })
}

export const webSignInPlugin = fp(webSignIn, { name: 'web-sign-in', fastify: '5.x', dependencies: ['auth', 'web-security'] })
