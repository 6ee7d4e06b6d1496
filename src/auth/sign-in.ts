import type { IdTokenVerifier, SignInClaims } from './id-token.js'
import type { NewSession, Session, SessionStore } from './session-store.js'

/**
 * The session of a sign-in that has passed every check of its ID token, back-channel logouts
 * included, unless a logout recorded while the session was being made ended that sign-in: then the
 * session is ended again at once and the answer is null (the caller refuses the sign-in; the token
 * never leaves).
 *
 * Why a second look: a logout marks the sign-ins it ends, then reads the sessions to end from the
 * store's indexes (web/backchannel.ts). A sign-in checked before the mark whose session was stored
 * after that read escaped both: neither refused nor ended. Looking again once the session is
 * stored closes that: a mark set before this look is seen here, and one set after it comes before
 * the logout's read, which then finds the new session and ends it.
 */
export async function createUnlessLoggedOut (
  sessions: SessionStore,
  verifier: Pick<IdTokenVerifier, 'loggedOut'>,
  signIn: SignInClaims,
  input: NewSession
): Promise<{ token: string, session: Session } | null> {
  const created = await sessions.create(input)
  if (!await verifier.loggedOut(signIn)) return created
  await sessions.revokeById(created.session.id)
  return null
}
