/**
 * The demo's fixed ports and the variables that move them. Its own module, free of imports, so
 * that `demo/main.ts` can judge the environment before loading the stack.
 */

export interface DemoPorts {
  /** The service (default 3000). */
  service: number
  /** The development IdP (default 4000). */
  idp: number
  /** The Care360 sandbox (default 4010). */
  sandbox: number
  /** The patient web page (default 5173). */
  page: number
}

export const DEFAULT_PORTS: DemoPorts = { service: 3000, idp: 4000, sandbox: 4010, page: 5173 }

export const PORT_VARIABLES: Record<keyof DemoPorts, string> = {
  service: 'DEMO_PORT',
  idp: 'DEMO_IDP_PORT',
  sandbox: 'DEMO_SANDBOX_PORT',
  page: 'DEMO_PAGE_PORT'
}
