import cockpit from "./cockpit.js";

export const NAME = "org.apmatrix.Apmatrix1";
const ERR = NAME + ".Error.";

/* The daemon's named errors as a sentence an admin can act on; its message adds the detail
   (which APQNs, which owner, which errno). */
const ERROR_TITLES = {
    Conflict: "Refused: these APQNs already belong to another matrix",
    HostOwned: "Refused: these APQNs are still in the host pool (reserve them first)",
    InvalidArgument: "Refused: invalid input",
    NotFound: "Not found (the matrix may have been removed meanwhile)",
    AlreadyExists: "Refused: that UUID or name is already taken",
    Busy: "Refused: busy (a matrix still holds these APQNs, a guest runs with it, or the s390 configuration lock is held)",
    Kernel: "The kernel refused the change; nothing was changed",
    Storage: "The state directory could not be written; the change was undone",
    Unavailable: "This kernel cannot do that",
    DriverOverride: "Refused: a queue is bound to another driver (driver_override)",
    Timeout: "The guest did not let go in time; nothing was changed",
    NotManaged: "Refused: another tool manages this matrix (take it over first)",
    Failed: "apmatrixd failed unexpectedly (see its journal)",
};
const DBUS_TITLES = {
    "org.freedesktop.DBus.Error.AccessDenied":
        "Not permitted: changing AP matrices needs administrative access",
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired":
        "Administrative access is needed: turn it on in Cockpit's top bar",
    "org.freedesktop.DBus.Error.ServiceUnknown": "apmatrixd is not running",
    "org.freedesktop.DBus.Error.NameHasNoOwner": "apmatrixd is not running",
    "org.freedesktop.DBus.Error.NoReply": "apmatrixd did not answer",
    "org.freedesktop.DBus.Error.UnknownMethod": "apmatrixd does not offer this (too old?)",
};

export function describe(err) {
    const name = (err && err.name) || "";
    let title = name.startsWith(ERR) ? ERROR_TITLES[name.slice(ERR.length)] : DBUS_TITLES[name];
    if (!title) title = name ? "Failed" : cockpit.message(err);
    let detail = (err && err.message) || "";
    if (detail === title) detail = "";
    return { title, detail, name };
}
