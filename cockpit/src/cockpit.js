/* The host's own cockpit.js (index.html loads ../base1/cockpit.js before the bundle): the
   bridge's, so the page speaks the protocol of the Cockpit it runs in (266 and later). */
const cockpit = window.cockpit;
export default cockpit;
