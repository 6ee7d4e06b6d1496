import type { IdTokenVerifier, SignInClaims } from './id-token.js'
import type { NewSession, Session, SessionStore } from './session-store.js'

/**
 * The session of a sign-in that has passed every check of its ID token, back-channel logouts
 * included, unless a logout recorded while the session was being made ended that sign-in: then the
 * session is ended again at once and the answer is null (the caller refuses the sign-in; the token
 * never leaves). A look that fails fails the sign-in, and ends its session too.
 *
 * Why a second look: a logout marks the sign-ins it ends, then reads the sessions to end from the
 * store's indexes (web/backchannel.ts). A sign-in checked before the mark whose session was stored
 * after that read escaped both: neither refused nor ended. Looking again once the session is
 * stored closes that: a mark set before this look is seen here, and one set after it comes before
 * the logout's read, which then finds the new session and ends it.
 */
export async function createUnlessLoggedOut (
  sessions: Pick<SessionStore, 'create' | 'revokeById'>,
  verifier: Pick<IdTokenVerifier, 'loggedOut'>,
  signIn: SignInClaims,
  input: NewSession
): Promise<{ token: string, session: Session } | null> {
  const created = await sessions.create(input)
  let loggedOut: boolean
  try {
    loggedOut = await verifier.loggedOut(signIn)
  } catch (error) {
    // The look failed (the logout marks unreachable): the sign-in fails with that error and its
    // token never leaves, so its session goes too. If the store fails that as well, the session
    // ends at its idle timeout, held by no one.
    await sessions.revokeById(created.session.id).catch(() => {})
    throw error
  }
  if (!loggedOut) return created
  await sessions.revokeById(created.session.id)
  return null
}
