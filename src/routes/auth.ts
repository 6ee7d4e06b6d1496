import cookie from '@fastify/cookie'
import type { FastifyInstance, FastifySchemaValidationError } from 'fastify'
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import { Type } from 'typebox'
import { ok } from '../errors.js'
import { errorAnswers } from '../schemas/appointments.js'
import { idTokenId, invalidIdToken, MAX_ID_TOKEN_LENGTH } from '../auth/id-token.js'
import { presentedToken } from '../auth/presented.js'
import { createUnlessLoggedOut } from '../auth/sign-in.js'

/** Mobile sign-in, session introspection and sign-out. Web sign-in is in web/routes.ts. */

const envelope = <T extends ReturnType<typeof Type.Object>>(data: T) => Type.Object({
  status: Type.Integer(),
  success: Type.Literal(true),
  message: Type.String(),
  data
}, { additionalProperties: false })

const SessionBody = Type.Object({
  idToken: Type.String({ minLength: 1, maxLength: MAX_ID_TOKEN_LENGTH, description: 'OIDC ID token from the patient identity provider' })
}, { additionalProperties: false })

const SessionCreated = envelope(Type.Object({
  token: Type.String({ description: 'Session token, sent back as `Authorization: Bearer <token>`' }),
  expiresAt: Type.String({ format: 'date-time', description: 'When the session ends unless used (idle) or at the latest (absolute)' }),
  email: Type.String()
}, { additionalProperties: false }))

const Me = envelope(Type.Object({
  authenticated: Type.Boolean(),
  email: Type.Optional(Type.String()),
  expiresAt: Type.Optional(Type.String({ format: 'date-time' }))
}, { additionalProperties: false }))

/** Other parameters (a cache-buster) are left alone, as on every route. */
const MeQuery = Type.Object({
  slide: Type.Optional(Type.Union([Type.Literal('true'), Type.Literal('false')], {
    description: '`false`: answer without sliding the session\'s idle expiry (a session monitor\'s poll, which must not keep an unattended session alive); default `true`'
  }))
})

const LoggedOut = envelope(Type.Object({
  endSessionUrl: Type.Optional(Type.String({ description: "Where to end the identity provider's session too, when it has an end-session endpoint: for a web session the full URL (with id_token_hint and the web app as post_logout_redirect_uri); for a mobile session the provider's endpoint, to which the app adds its own client_id, id_token_hint and post_logout_redirect_uri (OIDC RP-Initiated Logout)" }))
}, { additionalProperties: false }))

/**
 * A token longer than the limit is a bad token like any other (401), not a malformed request:
 * clients get one failure path for every token the IdP handed them that we will not take.
 */
function isOnlyTooLongToken (errors: FastifySchemaValidationError[]): boolean {
  return errors.length > 0 && errors.every((error) => error.instancePath === '/idToken' && error.keyword === 'maxLength')
}

export async function authRoutes (fastify: FastifyInstance): Promise<void> {
  const app = fastify.withTypeProvider<TypeBoxTypeProvider>()
  // Sign-out clears a web session's cookie (src/web/plugin.ts); nothing here reads cookies through
  // the plugin (sign-out's 401 reads the session cookie from the header itself: auth/presented.ts).
  await app.register(cookie, { hook: false })

  app.post('/auth/session', {
    // Real ID tokens fit in 8 KiB: the app-wide limit of the same size leaves no room for the JSON around one.
    bodyLimit: MAX_ID_TOKEN_LENGTH + 2048,
    attachValidation: true,
    // Every answer is a finished sign-in except a 429: a limiter refused it before it was tried.
    onResponse: function countSignIn (_request, reply, done) {
      if (reply.statusCode !== 429) app.metrics.recordSignIn('mobile', reply.statusCode === 201)
      done()
    },
    schema: {
      tags: ['auth'],
      summary: 'Mobile sign-in: exchanges an OIDC ID token for a session token',
      body: SessionBody,
      // 401: the ID token fails a check; 503: the IdP's keys or the store unreachable. Never 403:
      // it acts in no session, so a cookie sent along is not checked (web/csrf.ts).
      response: { 201: SessionCreated, ...errorAnswers(401, 503) }
    }
  }, async function createSession (request, reply) {
    if (request.validationError !== undefined) {
      if (isOnlyTooLongToken(request.validationError.validation)) throw invalidIdToken()
      throw request.validationError
    }
    const identity = await app.idTokenVerifier.verify(request.body.idToken)
    // Null: a back-channel logout of this sign-in landed while its session was being made.
    const created = await createUnlessLoggedOut(app.sessions, app.idTokenVerifier, identity, {
      email: identity.email,
      subject: identity.subject,
      issuer: identity.issuer,
      method: 'mobile',
      idpSessionId: identity.sid,
      idTokenId: idTokenId(request.body.idToken)
    })
    if (created === null) {
      // The line the verifier writes for a token refused at its own look (auth/id-token.ts).
      request.log.debug({ refusal: 'logged_out' }, 'ID token refused')
      throw invalidIdToken()
    }
    const { token, session } = created
    request.log.info({ patient: app.patientRef(session.email), method: 'mobile' }, 'session created')
    return reply.code(201).send(ok({
      token,
      expiresAt: new Date(session.expiresAt).toISOString(),
      email: session.email
    }, 'Session created', 201))
  })

  app.get('/auth/me', {
    config: { auth: 'optional', slideOptional: true },
    schema: {
      tags: ['auth'],
      summary: 'Whether the caller has a session, and until when',
      querystring: MeQuery,
      response: { 200: Me }
    }
  }, async function whoAmI (request) {
    const session = request.session
    if (session === null) return ok({ authenticated: false })
    return ok({ authenticated: true, email: session.email, expiresAt: new Date(session.expiresAt).toISOString() })
  })

  /**
   * A mobile session's end-session URL: the provider's endpoint as its discovery (made already:
   * a sign-out never waits on the IdP; a replica that has made none starts one for the next)
   * names it. The app ends the IdP's session with it, adding what only it holds.
   */
  function providerEndSession (): string | null {
    const discovered = app.issuerKeys.discovered()
    if (discovered === null) {
      app.issuerKeys.resolve().catch(() => {})
      return null
    }
    return discovered.endSessionEndpoint
  }

  app.post('/auth/logout', {
    // Never refused for the session's quota, nor for its address's other traffic: only its own
    // refusals count against RATE_LIMIT_IP (invalid tokens), so a flood of those is still stopped.
    config: { auth: 'required', sessionLimit: false, ipLimit: 'refusals' },
    schema: {
      tags: ['auth'],
      summary: 'Ends this session (cookie or bearer)',
      response: { 200: LoggedOut }
    },
    // A session cookie whose session has ended already (idle, absolute, ended elsewhere): the 401
    // clears it and still names the IdP's end-session URL (`data.endSessionUrl`), so that signing
    // out signs out of the identity provider too. Otherwise, on a shared device, the next patient's
    // sign-in would go straight through the IdP's session as this one.
    preSerialization: async function signOutOfTheIdp (request, reply, payload: unknown) {
      if (reply.statusCode !== 401 || presentedToken(request)?.transport !== 'cookie') return payload
      const endSessionUrl = await app.webSignIn.signOutEnded(reply)
      return endSessionUrl === null ? payload : { ...(payload as object), data: { endSessionUrl } }
    }
  }, async function logout (request, reply) {
    // Required auth guarantees a session here.
    const session = request.session as NonNullable<typeof request.session>
    // First: with the store down, a 503 and nothing done, rather than a session ended whose ID
    // token could still sign back in.
    if (session.idTokenId !== null) await app.idTokenVerifier.retire(session.idTokenId)
    await app.sessions.revokeById(session.id)
    request.log.info({ method: session.method }, 'session ended')
    // Web sign-in (src/web/plugin.ts): clears a session cookie, and names the IdP's end-session URL.
    const webUrl = await app.webSignIn.signOut(request, reply)
    const endSessionUrl = session.method === 'mobile' ? providerEndSession() : webUrl
    return ok(endSessionUrl === null ? {} : { endSessionUrl }, 'Signed out')
  })
}
