import { UpstreamError } from '../../src/care360/client.js'

/** The UpstreamError a call of the Care360 client fails with; any other outcome fails the test. */
export async function failureOf (promise: Promise<unknown>): Promise<UpstreamError> {
  try {
    await promise
  } catch (error) {
    if (error instanceof UpstreamError) return error
    throw error
  }
  throw new Error('expected the call to fail')
}
